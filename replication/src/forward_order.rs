//! The order of the writes a node forwards to its group's leader.
//!
//! A node that does not lead forwards each write it is given to the
//! leader, as a request of its own, over one of several pooled
//! connections: two forwards in flight at once may reach the leader in
//! either order. A producer with several batches in flight through a
//! follower would then find them stored out of order.
//!
//! Each node's group replica numbers its writes in the order they are
//! proposed ([`ForwardStream`]: one stream per replica, a random id per
//! process); a forward carries its stream, its number and the stream's
//! *floor*, the smallest number still unanswered on the sending node. The
//! leader ([`ForwardOrder`]) submits a stream's forwards in their
//! numbers' order: a forward waits until every smaller number at or
//! above the floor has been submitted here.
//!
//! # Invariants
//!
//! - While one node leads, the forwards of one stream that reach it are
//!   submitted to Raft (whose log keeps the submission order) in the
//!   order of their numbers. A smaller number that is here already is
//!   waited for until it is submitted (a handover may hold it at the
//!   write gate for seconds); while one is missing, a forward waits at
//!   most [`ORDER_WAIT`] from its arrival (for a write abandoned before
//!   it was forwarded, whose number the floor had not yet passed when the
//!   later one was sent): it then goes, late numbers after it go at once,
//!   and the order of those two is lost.
//! - Waiting never blocks another stream, nor any other request.
//! - Across a change of leader the order holds for the forwards the new
//!   leader receives, from the floor each carries, as long as each
//!   arrives within [`ORDER_WAIT`] of the later ones: a write the old
//!   leader refused and the sender retries keeps its number.
//! - The leader keeps a small state per stream, forgotten after
//!   [`STREAM_IDLE`] without a forward once more than
//!   [`STREAMS_KEPT`] streams are known.

use std::collections::{BTreeSet, HashMap};
use std::hash::{BuildHasher, Hasher};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::cluster_storage::lock;

/// The longest a forward waits at the leader for a smaller number of its
/// stream that has not arrived (one that has is waited for until it is
/// submitted). A number that never comes is rare (a write abandoned
/// between being numbered and being forwarded), and the forwards of a
/// stream with a steady leader arrive within milliseconds of each other.
pub const ORDER_WAIT: Duration = Duration::from_secs(1);

/// How many streams a leader keeps before it forgets the idle ones.
pub const STREAMS_KEPT: usize = 1024;

/// How long a stream is kept without a forward once more than
/// [`STREAMS_KEPT`] are known.
pub const STREAM_IDLE: Duration = Duration::from_secs(60);

/// A replica's numbering of its writes, as a sender of forwards.
#[derive(Debug)]
pub struct ForwardStream {
    id: u64,
    numbers: Mutex<Numbers>,
    /// Writes sent on to another node's Raft port (this node did not
    /// lead): what a client routing to leaders saves.
    forwarded: std::sync::atomic::AtomicU64,
}

#[derive(Debug, Default)]
struct Numbers {
    next: u64,
    unanswered: BTreeSet<u64>,
}

/// One write's number in its [`ForwardStream`]; unanswered until dropped.
#[derive(Debug)]
pub struct ForwardTicket {
    stream: Arc<ForwardStream>,
    seq: u64,
}

/// Where a forward stands in its stream, as the leader is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForwardPlace {
    /// The sending replica's stream.
    pub stream: u64,
    /// This write's number.
    pub seq: u64,
    /// Every number below this one is answered on the sender: the leader
    /// waits for none of them.
    pub floor: u64,
}

impl ForwardStream {
    /// A stream with a random id (another per process and replica).
    pub fn new() -> Arc<ForwardStream> {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |since| since.as_nanos()),
        );
        Arc::new(ForwardStream {
            id: hasher.finish(),
            numbers: Mutex::default(),
            forwarded: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// The next number, unanswered until the ticket is dropped.
    pub fn issue(self: &Arc<Self>) -> ForwardTicket {
        let mut numbers = lock(&self.numbers);
        let seq = numbers.next;
        numbers.next += 1;
        numbers.unanswered.insert(seq);
        ForwardTicket {
            stream: Arc::clone(self),
            seq,
        }
    }

    /// How many writes of this stream were forwarded to another node.
    pub fn forwarded(&self) -> u64 {
        self.forwarded.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The smallest number not yet answered (the next one if none).
    fn floor(&self) -> u64 {
        let numbers = lock(&self.numbers);
        numbers.unanswered.first().copied().unwrap_or(numbers.next)
    }
}

impl ForwardTicket {
    /// Counts this write as forwarded (once per try sent to a leader).
    pub fn note_forwarded(&self) {
        self.stream
            .forwarded
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// The place to send with this write's forward (the floor as of now).
    pub fn place(&self) -> ForwardPlace {
        ForwardPlace {
            stream: self.stream.id,
            seq: self.seq,
            floor: self.stream.floor(),
        }
    }
}

impl Drop for ForwardTicket {
    fn drop(&mut self) {
        lock(&self.stream.numbers).unanswered.remove(&self.seq);
    }
}

/// A leader's view of the streams forwarding to it (see the module docs).
#[derive(Debug, Default)]
pub struct ForwardOrder {
    streams: Mutex<HashMap<u64, Turn>>,
}

#[derive(Debug)]
struct Turn {
    state: watch::Sender<StreamState>,
    used: Instant,
}

#[derive(Debug, Default)]
struct StreamState {
    /// The smallest number not yet submitted (nor passed by a floor).
    next: u64,
    /// Numbers here and not yet submitted (or given up).
    arrived: BTreeSet<u64>,
}

impl StreamState {
    /// Whether every number from `next` up to `seq` is here.
    fn all_before_arrived(&self, seq: u64) -> bool {
        seq <= self.next || self.arrived.range(self.next..seq).count() as u64 == seq - self.next
    }
}

/// A forward at the leader, from its arrival until it is submitted or
/// dropped (then a later number no longer waits for it without bound).
#[derive(Debug)]
pub struct Arrival<'a> {
    order: &'a ForwardOrder,
    place: ForwardPlace,
    in_turn: bool,
    submitted: bool,
}

impl ForwardOrder {
    /// Waits until `place` is its stream's turn: every smaller number at
    /// or above its floor was submitted. A number that is here already is
    /// waited for as long as it takes (it is being submitted: a handover
    /// may hold it at the gate for seconds); while one is missing, at most
    /// [`ORDER_WAIT`] in all.
    pub async fn wait_turn(&self, place: ForwardPlace) -> Arrival<'_> {
        let mut state = {
            let mut streams = lock(&self.streams);
            let now = Instant::now();
            if streams.len() > STREAMS_KEPT {
                streams.retain(|_, turn| now.duration_since(turn.used) < STREAM_IDLE);
            }
            let turn = streams.entry(place.stream).or_insert_with(|| Turn {
                state: watch::channel(StreamState {
                    next: place.floor,
                    arrived: BTreeSet::new(),
                })
                .0,
                used: now,
            });
            turn.used = now;
            turn.state.send_modify(|state| {
                raise(&mut state.next, place.floor);
                state.arrived.insert(place.seq);
            });
            turn.state.subscribe()
        };
        let mut arrival = Arrival {
            order: self,
            place,
            in_turn: false,
            submitted: false,
        };
        let deadline = tokio::time::Instant::now() + ORDER_WAIT;
        loop {
            let (in_turn, all_before_arrived) = {
                let state = state.borrow_and_update();
                (state.next >= place.seq, state.all_before_arrived(place.seq))
            };
            if in_turn {
                arrival.in_turn = true;
                return arrival;
            }
            let changed = if all_before_arrived {
                state.changed().await
            } else {
                match tokio::time::timeout_at(deadline, state.changed()).await {
                    Ok(changed) => changed,
                    Err(_) => return arrival,
                }
            };
            if changed.is_err() {
                // The stream was forgotten: nothing to wait for.
                return arrival;
            }
        }
    }

    /// Raises `place`'s stream's next number to `to`, and forgets
    /// `place`'s arrival.
    fn leave(&self, place: ForwardPlace, to: u64) {
        if let Some(turn) = lock(&self.streams).get(&place.stream) {
            turn.state.send_modify(|state| {
                state.arrived.remove(&place.seq);
                raise(&mut state.next, to);
            });
        }
    }
}

impl Arrival<'_> {
    /// Whether its turn came (false: it waited [`ORDER_WAIT`] in vain for
    /// a number that never came).
    pub fn in_turn(&self) -> bool {
        self.in_turn
    }

    /// The write was submitted: the stream's next number may go.
    pub fn submitted(mut self) {
        self.order
            .leave(self.place, self.place.seq.saturating_add(1));
        self.submitted = true;
    }
}

impl Drop for Arrival<'_> {
    /// Dropped unsubmitted (its handler stopped): later numbers wait for
    /// it no longer than for a missing one.
    fn drop(&mut self) {
        if !self.submitted {
            self.order.leave(self.place, 0);
        }
    }
}

/// Raises `next` to `to` if below.
fn raise(next: &mut u64, to: u64) {
    *next = (*next).max(to);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_numbers_in_order_and_its_floor_is_the_oldest_unanswered() {
        let stream = ForwardStream::new();
        let first = stream.issue();
        let second = stream.issue();
        let third = stream.issue();
        assert_eq!((first.seq, second.seq, third.seq), (0, 1, 2));
        assert_eq!(third.place().floor, 0);
        drop(second);
        assert_eq!(third.place().floor, 0, "the first is still unanswered");
        drop(first);
        assert_eq!(third.place().floor, 2);
        drop(third);
        assert_eq!(stream.floor(), 3, "none unanswered: the next number");
        assert_ne!(ForwardStream::new().id, stream.id, "each stream its own id");
    }

    fn place(seq: u64, floor: u64) -> ForwardPlace {
        ForwardPlace {
            stream: 7,
            seq,
            floor,
        }
    }

    /// Waits for `place`'s turn, submits it at once; whether it was in turn.
    async fn submit(order: &ForwardOrder, place: ForwardPlace) -> bool {
        let arrival = order.wait_turn(place).await;
        let in_turn = arrival.in_turn();
        arrival.submitted();
        in_turn
    }

    /// [`submit`] in a task of its own, which answers whether it was in
    /// turn and when it was submitted.
    fn spawn_submit(
        order: &Arc<ForwardOrder>,
        place: ForwardPlace,
    ) -> tokio::task::JoinHandle<(bool, tokio::time::Instant)> {
        let order = Arc::clone(order);
        tokio::spawn(async move {
            let in_turn = submit(&order, place).await;
            (in_turn, tokio::time::Instant::now())
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_later_number_waits_for_the_earlier_ones_to_be_submitted() {
        let order = Arc::new(ForwardOrder::default());
        // 2 arrives first, sent while 0 and 1 were unanswered.
        let later = spawn_submit(&order, place(2, 0));
        tokio::task::yield_now().await;
        assert!(!later.is_finished());
        let start = tokio::time::Instant::now();
        let first = order.wait_turn(place(0, 0)).await;
        assert!(first.in_turn(), "0 waits for nothing");
        tokio::time::advance(Duration::from_millis(5)).await;
        first.submitted();
        let second = order.wait_turn(place(1, 0)).await;
        assert!(second.in_turn());
        tokio::time::advance(Duration::from_millis(5)).await;
        second.submitted();
        let (in_turn, at) = later.await.expect("the later forward's task");
        assert!(in_turn);
        assert_eq!(
            at - start,
            Duration::from_millis(10),
            "it went once 1 was in"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_number_here_is_waited_for_beyond_order_wait() {
        let order = Arc::new(ForwardOrder::default());
        // 0 is here but held (a handover's gate) for three seconds.
        let held = order.wait_turn(place(0, 0)).await;
        assert!(held.in_turn());
        let later = spawn_submit(&order, place(1, 0));
        let start = tokio::time::Instant::now();
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(!later.is_finished(), "1 still waits for 0");
        held.submitted();
        let (in_turn, at) = later.await.expect("the later forward's task");
        assert!(in_turn);
        assert_eq!(at - start, Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn a_number_dropped_unsubmitted_holds_the_next_for_order_wait_only() {
        let order = Arc::new(ForwardOrder::default());
        let held = order.wait_turn(place(0, 0)).await;
        let later = spawn_submit(&order, place(1, 0));
        let start = tokio::time::Instant::now();
        tokio::time::sleep(Duration::from_millis(300)).await;
        drop(held);
        let (in_turn, at) = later.await.expect("the later forward's task");
        assert!(!in_turn, "0 never was submitted");
        assert_eq!(at - start, ORDER_WAIT);
    }

    #[tokio::test(start_paused = true)]
    async fn a_floor_past_a_missing_number_lets_the_waiting_one_go() {
        let order = Arc::new(ForwardOrder::default());
        assert!(submit(&order, place(0, 0)).await);
        // 1 was abandoned on the sender before it was forwarded; 2 was
        // sent while 1 was still unanswered there.
        let waiting = tokio::spawn({
            let order = Arc::clone(&order);
            async move { submit(&order, place(2, 1)).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        // 3, sent after 1 was dropped, carries a floor past it; it waits
        // for 2 in turn.
        let start = tokio::time::Instant::now();
        assert!(submit(&order, place(3, 2)).await);
        assert_eq!(start.elapsed(), Duration::ZERO);
        assert!(
            waiting.await.expect("the waiting forward's task"),
            "the floor, not the timeout, let 2 go"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_number_that_never_comes_holds_the_next_for_order_wait_only() {
        let order = ForwardOrder::default();
        assert!(submit(&order, place(0, 0)).await);
        let start = tokio::time::Instant::now();
        assert!(!submit(&order, place(2, 1)).await, "1 never came");
        assert_eq!(start.elapsed(), ORDER_WAIT);
        // 1, very late, goes at once: it can no longer be first.
        assert!(submit(&order, place(1, 1)).await);
        assert_eq!(start.elapsed(), ORDER_WAIT);
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_leader_starts_each_stream_at_its_floor() {
        let order = ForwardOrder::default();
        // The stream's first forward here: 5 and 6 are unanswered on the
        // sender, 6 arrives first and waits for 5.
        let early = submit(&order, place(6, 5));
        tokio::pin!(early);
        assert!(
            tokio::time::timeout(Duration::from_millis(1), &mut early)
                .await
                .is_err(),
            "6 waits for 5"
        );
        assert!(submit(&order, place(5, 5)).await);
        assert!(early.await);
    }

    #[test]
    fn idle_streams_are_forgotten_once_many_are_known() {
        let order = ForwardOrder::default();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a runtime");
        for stream in 0..=STREAMS_KEPT as u64 {
            let place = ForwardPlace {
                stream,
                seq: 0,
                floor: 0,
            };
            assert!(runtime.block_on(submit(&order, place)));
        }
        for turn in lock(&order.streams).values_mut() {
            turn.used -= STREAM_IDLE;
        }
        let fresh = ForwardPlace {
            stream: u64::MAX,
            seq: 0,
            floor: 0,
        };
        assert!(runtime.block_on(submit(&order, fresh)));
        assert_eq!(lock(&order.streams).len(), 1, "only the fresh one kept");
    }
}
