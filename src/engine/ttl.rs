//! Stored value framing, with and without TTL timestamps.
//!
//! Without TTL a stored value is the encoded value. With TTL it is
//! `write time (u64 big-endian, ms) ‖ encoded value`; a value is expired when
//! `now >= write time + ttl`.
//!
//! A list is a concatenation of elements, each
//! `payload length (u32 big-endian) ‖ [write time (u64 big-endian) when TTL] ‖ payload`,
//! so that RocksDB's merge operator can append by concatenation.

use crate::error::{Error, Result};

const TS_LEN: usize = 8;
const LEN_LEN: usize = 4;

/// Whether a value written at `written` has expired at `now` under `ttl_ms`.
pub(crate) fn is_expired(written: u64, ttl_ms: u64, now: u64) -> bool {
    now >= written.saturating_add(ttl_ms)
}

/// Frames an encoded value for storage.
pub(crate) fn frame_value(ttl_ms: Option<u64>, now: u64, payload: &[u8]) -> Vec<u8> {
    match ttl_ms {
        None => payload.to_vec(),
        Some(_) => {
            let mut out = Vec::with_capacity(TS_LEN + payload.len());
            out.extend_from_slice(&now.to_be_bytes());
            out.extend_from_slice(payload);
            out
        }
    }
}

/// Splits a stored value into its write time (TTL only) and payload.
pub(crate) fn split_value<'a>(
    raw: &'a [u8],
    ttl: bool,
    what: &dyn Fn() -> String,
) -> Result<(Option<u64>, &'a [u8])> {
    if !ttl {
        return Ok((None, raw));
    }
    if raw.len() < TS_LEN {
        return Err(Error::corrupt(
            what(),
            format!("value of {} bytes has no TTL timestamp", raw.len()),
        ));
    }
    let (ts, payload) = raw.split_at(TS_LEN);
    let mut buf = [0u8; TS_LEN];
    buf.copy_from_slice(ts);
    Ok((Some(u64::from_be_bytes(buf)), payload))
}

/// The payload of a stored value if it is still live at `now`.
pub(crate) fn live_value<'a>(
    raw: &'a [u8],
    ttl_ms: Option<u64>,
    now: u64,
    what: &dyn Fn() -> String,
) -> Result<Option<&'a [u8]>> {
    let (ts, payload) = split_value(raw, ttl_ms.is_some(), what)?;
    match (ts, ttl_ms) {
        (Some(ts), Some(ttl)) if is_expired(ts, ttl, now) => Ok(None),
        _ => Ok(Some(payload)),
    }
}

/// Appends one framed list element to `out`.
pub(crate) fn frame_element(
    out: &mut Vec<u8>,
    ttl_ms: Option<u64>,
    now: u64,
    payload: &[u8],
) -> Result<()> {
    let len = u32::try_from(payload.len()).map_err(|_| {
        Error::invalid(format!(
            "list element of {} bytes exceeds 4 GiB",
            payload.len()
        ))
    })?;
    out.extend_from_slice(&len.to_be_bytes());
    if ttl_ms.is_some() {
        out.extend_from_slice(&now.to_be_bytes());
    }
    out.extend_from_slice(payload);
    Ok(())
}

/// What of a stored entry of a state of `kind` with time to live `ttl_ms` is live at
/// `now`: `None` when nothing is, the entry as it is when all of it is, or a list without
/// its expired elements.
///
/// Errors: a description of the damage, for a value without a timestamp or a truncated
/// list element.
pub(crate) fn live_part(
    kind: crate::format::StateKind,
    raw: &[u8],
    ttl_ms: u64,
    now: u64,
) -> std::result::Result<Option<std::borrow::Cow<'_, [u8]>>, String> {
    if kind != crate::format::StateKind::List {
        if raw.len() < TS_LEN {
            return Err(format!("value of {} bytes has no TTL timestamp", raw.len()));
        }
        let mut ts = [0u8; TS_LEN];
        ts.copy_from_slice(&raw[..TS_LEN]);
        return Ok((!is_expired(u64::from_be_bytes(ts), ttl_ms, now)).then_some(raw.into()));
    }
    let expired = |e: &Element<'_>| e.written.is_some_and(|ts| is_expired(ts, ttl_ms, now));
    let mut any_expired = false;
    for element in Elements::new(raw, true) {
        any_expired |= expired(&element?);
    }
    if !any_expired {
        // The common case: the list as it is, without a copy.
        return Ok((!raw.is_empty()).then_some(raw.into()));
    }
    let mut kept = Vec::new();
    for element in Elements::new(raw, true) {
        let element = element?;
        if !expired(&element) {
            frame_element(
                &mut kept,
                Some(ttl_ms),
                element.written.unwrap_or(0),
                element.payload,
            )
            .map_err(|e| e.to_string())?;
        }
    }
    Ok((!kept.is_empty()).then_some(kept.into()))
}

/// Length of `element` in its framed form.
pub(crate) fn element_len(element: &Element<'_>, ttl: bool) -> usize {
    LEN_LEN + if ttl { TS_LEN } else { 0 } + element.payload.len()
}

/// One element of a stored list.
pub(crate) struct Element<'a> {
    pub written: Option<u64>,
    pub payload: &'a [u8],
}

/// Iterates over the framed elements of a stored list; a truncated element is an error.
pub(crate) struct Elements<'a> {
    rest: &'a [u8],
    ttl: bool,
}

impl<'a> Elements<'a> {
    pub(crate) fn new(raw: &'a [u8], ttl: bool) -> Self {
        Self { rest: raw, ttl }
    }
}

impl<'a> Iterator for Elements<'a> {
    type Item = std::result::Result<Element<'a>, String>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let header = LEN_LEN + if self.ttl { TS_LEN } else { 0 };
        if self.rest.len() < header {
            let n = self.rest.len();
            self.rest = &[];
            return Some(Err(format!(
                "list element header truncated ({n} bytes left)"
            )));
        }
        let mut len_buf = [0u8; LEN_LEN];
        len_buf.copy_from_slice(&self.rest[..LEN_LEN]);
        let len = u32::from_be_bytes(len_buf) as usize;
        let written = self.ttl.then(|| {
            let mut ts = [0u8; TS_LEN];
            ts.copy_from_slice(&self.rest[LEN_LEN..LEN_LEN + TS_LEN]);
            u64::from_be_bytes(ts)
        });
        let body = &self.rest[header..];
        if body.len() < len {
            let n = body.len();
            self.rest = &[];
            return Some(Err(format!(
                "list element claims {len} bytes but {n} remain"
            )));
        }
        let (payload, rest) = body.split_at(len);
        self.rest = rest;
        Some(Ok(Element { written, payload }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn what() -> String {
        "test".into()
    }

    #[test]
    fn value_framing_round_trip_and_expiry() {
        let plain = frame_value(None, 5, b"abc");
        assert_eq!(plain, b"abc");
        assert_eq!(
            live_value(&plain, None, 99, &what).unwrap(),
            Some(&b"abc"[..])
        );

        let framed = frame_value(Some(10), 100, b"abc");
        assert_eq!(framed.len(), 11);
        assert_eq!(
            live_value(&framed, Some(10), 109, &what).unwrap(),
            Some(&b"abc"[..])
        );
        assert_eq!(live_value(&framed, Some(10), 110, &what).unwrap(), None);
        assert!(live_value(&framed[..5], Some(10), 0, &what).is_err());
        assert!(!is_expired(u64::MAX, 10, u64::MAX - 1));
    }

    #[test]
    fn expired_parts_are_left_out() {
        use crate::format::StateKind;
        let value = frame_value(Some(10), 100, b"v");
        assert_eq!(
            live_part(StateKind::Value, &value, 10, 109)
                .unwrap()
                .as_deref(),
            Some(&value[..])
        );
        assert_eq!(live_part(StateKind::Map, &value, 10, 110).unwrap(), None);
        assert!(live_part(StateKind::Value, b"abc", 10, 0).is_err());
        let mut list = Vec::new();
        frame_element(&mut list, Some(10), 100, b"old").unwrap();
        frame_element(&mut list, Some(10), 105, b"new").unwrap();
        assert_eq!(
            live_part(StateKind::List, &list, 10, 104)
                .unwrap()
                .as_deref(),
            Some(&list[..])
        );
        let mut only_new = Vec::new();
        frame_element(&mut only_new, Some(10), 105, b"new").unwrap();
        assert_eq!(
            live_part(StateKind::List, &list, 10, 112)
                .unwrap()
                .as_deref(),
            Some(&only_new[..])
        );
        assert_eq!(live_part(StateKind::List, &list, 10, 115).unwrap(), None);
        assert!(live_part(StateKind::List, &list[..list.len() - 1], 10, 0).is_err());
    }

    #[test]
    fn element_framing_round_trip_and_truncation() {
        for ttl in [None, Some(7)] {
            let mut raw = Vec::new();
            frame_element(&mut raw, ttl, 1, b"one").unwrap();
            frame_element(&mut raw, ttl, 2, b"").unwrap();
            frame_element(&mut raw, ttl, 3, b"three").unwrap();
            let got: Vec<_> = Elements::new(&raw, ttl.is_some())
                .map(|e| e.unwrap())
                .map(|e| (e.written, e.payload.to_vec()))
                .collect();
            let ts = |t| ttl.map(|_| t);
            assert_eq!(
                got,
                vec![
                    (ts(1), b"one".to_vec()),
                    (ts(2), vec![]),
                    (ts(3), b"three".to_vec())
                ]
            );
            for cut in 1..raw.len() {
                let all: Vec<_> = Elements::new(&raw[..cut], ttl.is_some()).collect();
                let complete = [3usize, 0, 5]
                    .iter()
                    .scan(0, |acc, l| {
                        *acc += 4 + l + if ttl.is_some() { 8 } else { 0 };
                        Some(*acc)
                    })
                    .any(|end| end == cut);
                assert_eq!(all.iter().any(|e| e.is_err()), !complete, "cut {cut}");
            }
        }
    }
}
