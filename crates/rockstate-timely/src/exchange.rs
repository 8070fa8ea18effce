//! Small all-to-all exchanges between the workers, used to agree before the dataflow runs.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::operator::Operator;
use timely::dataflow::InputHandleVec;
use timely::worker::Worker;

use rockstate::{Error, Result};

/// Every worker contributes `mine`; every worker gets all contributions, in worker order.
/// Steps the worker (other dataflows too) until they are in.
pub fn all_gather(worker: &mut Worker, mine: Vec<u8>) -> Vec<Vec<u8>> {
    use timely::dataflow::operators::vec::Broadcast;
    let peers = worker.peers();
    type Received = Rc<RefCell<Vec<(u64, Vec<u8>)>>>;
    let received: Received = Rc::default();
    let sink = received.clone();
    let mut input: InputHandleVec<u64, (u64, Vec<u8>)> = InputHandleVec::new();
    worker.dataflow::<u64, _, _>(|scope| {
        input
            .to_stream(scope)
            .broadcast()
            .sink(Pipeline, "Gather", move |(data, _frontier)| {
                data.for_each(|_, batch| sink.borrow_mut().extend(batch.drain(..)));
            });
    });
    input.send((worker.index() as u64, mine));
    input.close();
    while received.borrow().len() < peers {
        worker.step_or_park(Some(Duration::from_millis(1)));
    }
    let mut all = received.take();
    all.sort_by_key(|(i, _)| *i);
    all.into_iter().map(|(_, bytes)| bytes).collect()
}

/// Every worker tells every other one whether it could `what` (its failure, if any):
/// `Err` naming the first worker that could not, on every worker alike.
pub(crate) fn agree(worker: &mut Worker, mine: Option<&impl ToString>, what: &str) -> Result<()> {
    let mine = mine.map(ToString::to_string);
    let bytes = serde_json::to_vec(&mine)
        .map_err(|e| Error::Internal(format!("encode an outcome: {e}")))?;
    for (i, bytes) in all_gather(worker, bytes).iter().enumerate() {
        let theirs: Option<String> = serde_json::from_slice(bytes)
            .map_err(|e| Error::Internal(format!("decode an outcome: {e}")))?;
        if let Some(reason) = theirs {
            return Err(Error::Internal(format!(
                "worker {i} could not {what}: {reason}"
            )));
        }
    }
    Ok(())
}
