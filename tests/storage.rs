//! CheckpointStorage: URLs, path safety, listing.

use rockstate::{CheckpointStorage, ErrorKind};

#[test]
fn urls_open_or_fail_clearly() {
    let err = CheckpointStorage::open("ftp://host/x").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    assert!(err.to_string().contains("ftp"), "{err}");
    assert_eq!(
        CheckpointStorage::open("").unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );

    let dir = tempfile::tempdir().unwrap();
    let plain = CheckpointStorage::open(dir.path().join("a/b").to_str().unwrap()).unwrap();
    assert!(
        dir.path().join("a/b").is_dir(),
        "local directories are created"
    );
    assert!(plain.url().starts_with("file://"));
    let url = format!("file://{}/c", dir.path().display());
    CheckpointStorage::open(&url).unwrap();
    assert!(dir.path().join("c").is_dir());
    let s3 = CheckpointStorage::open_with(
        "s3://bucket/prefix",
        [
            ("aws_region", "us-east-1"),
            ("aws_endpoint", "http://127.0.0.1:1"),
        ],
    )
    .unwrap();
    assert_eq!(s3.url(), "s3://bucket/prefix");
}

#[tokio::test]
async fn paths_never_escape_the_root() {
    let dir = tempfile::tempdir().unwrap();
    let root = CheckpointStorage::open(dir.path().join("root").to_str().unwrap()).unwrap();
    for bad in ["..", ".", "a/b", "", "x\0"] {
        assert_eq!(
            root.child(bad).unwrap_err().kind(),
            ErrorKind::InvalidArgument,
            "{bad:?}"
        );
    }
    let job = root.child("job").unwrap();
    std::fs::write(dir.path().join("secret"), b"s").unwrap();
    for bad in ["../../secret", "/secret", "a/../../secret", "chk-1//x"] {
        let err = job.put_if_absent(bad, "x".into()).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Corrupt, "{bad:?}");
        assert!(job.read_small(bad, 10).await.is_err());
        assert!(job.delete(bad).await.is_err());
    }
    assert!(dir.path().join("secret").exists());

    job.put_if_absent("chk-1/_metadata", "m".into())
        .await
        .unwrap();
    job.put_if_absent("shared/a.sst", "aa".into())
        .await
        .unwrap();
    let mut listed: Vec<_> = job
        .list("")
        .await
        .unwrap()
        .into_iter()
        .map(|o| (o.path, o.size))
        .collect();
    listed.sort();
    assert_eq!(
        listed,
        vec![
            ("chk-1/_metadata".to_string(), 1),
            ("shared/a.sst".to_string(), 2)
        ]
    );
    assert_eq!(job.list("shared").await.unwrap().len(), 1);
    job.delete("shared/a.sst").await.unwrap();
    job.delete("shared/a.sst").await.unwrap();
    assert_eq!(
        job.read_small("shared/a.sst", 10).await.unwrap_err().kind(),
        ErrorKind::NotFound
    );
}
