//! Routing a producer's batches to their partitions' leaders on a cluster.
//!
//! Any node of a cluster takes every produce and forwards a partition's
//! records to that partition's leader (docs/replication.md): correct, but
//! one hop more for every batch whose leader is another node. A producer
//! whose broker is a cluster node (HELLO_OK's `broker_id` is a node id)
//! asks PARTITION_LEADERS (PROTOCOL.md §6.38) per topic and sends each
//! batch of one partition over a connection of its own to that partition's
//! leader. What it owns:
//!
//! - **Leaders per topic**, asked through the producer's own client, again
//!   after [`ROUTES_MAX_AGE`] or after a routed batch failed. The answer is
//!   a hint: a batch sent to a node that no longer leads is forwarded by
//!   that node, so a stale route costs a hop, never a message.
//! - **A partition for each batch**: a batch of unkeyed records takes the
//!   next partition round robin (as the broker would, per batch); a batch
//!   of keyed records was put together per partition already
//!   (`dmq_protocol::key_partition`, the broker's rule), once the topic's
//!   partition count was known. A batch mixing keys the producer could not
//!   place yet goes to the producer's own node, which routes it.
//! - **Links**: one [`Client`] per other node, opened on first use (a
//!   partition the producer's own node leads goes on its own connection). A link
//!   not connected right now is passed over (the batch goes through the
//!   producer's own node) and the routes are asked again; a link that
//!   could not be opened is not tried again for [`LINK_RETRY_AFTER`].
//! - **Order across a change of route.** Batches of one partition on one
//!   connection are stored in the order sent (the broker queues a
//!   connection's batches in request order). When a partition's route
//!   moves to another connection, its next batch waits until the batches
//!   in flight on the old one are answered, so it cannot overtake them.
//!   Batches the producer's own node routes (mixed keys) and routed ones
//!   on other connections wait for each other the same way.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dmq_protocol::{PartitionLeader, ProduceRecord};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::client::Client;
use crate::connection::ConnState;

/// Leaders are asked again this long after the last answer.
pub const ROUTES_MAX_AGE: Duration = Duration::from_secs(3);
/// How long asking for leaders, or opening a link, may hold the batches.
const ASK_TIMEOUT: Duration = Duration::from_secs(1);
/// A node whose link could not be opened is not tried again before this.
const LINK_RETRY_AFTER: Duration = Duration::from_secs(5);

/// A count of things in flight that a waiter can watch fall to zero; one
/// [`Counted`] guard per thing.
pub(crate) type InFlightCount = Arc<watch::Sender<usize>>;

/// One thing counted in an [`InFlightCount`] while the guard lives.
pub(crate) struct Counted(InFlightCount);

impl Counted {
    pub(crate) fn start(count: &InFlightCount) -> Counted {
        count.send_modify(|n| *n += 1);
        Counted(Arc::clone(count))
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

pub(crate) fn new_count() -> InFlightCount {
    Arc::new(watch::Sender::new(0))
}

async fn wait_idle(count: &InFlightCount) {
    let _ = count.subscribe().wait_for(|n| *n == 0).await;
}

/// Where one batch goes, chosen by [`Routing::route`].
pub(crate) struct Route {
    /// The leader's link; `None`: the producer's own client.
    pub link: Option<Client>,
    /// The batch's partition, if the producer placed it.
    pub partition: Option<u32>,
    /// Counts the batch in flight on its route until dropped.
    pub order: Counted,
    /// The topic's partition count, when this route's ask of the leaders
    /// learned it (the first answer, or one with another count): keyed
    /// records are placed by it from now on.
    pub partitions_learned: Option<u32>,
}

/// The leaders of one topic, as last answered.
struct TopicRoutes {
    /// When the leaders were last asked; `None`: ask before the next batch.
    asked: Option<Instant>,
    /// One per partition; empty: the broker gave none (not a cluster
    /// topic's answer, or the ask failed): every batch through the
    /// producer's own node.
    leaders: Vec<PartitionLeader>,
    next_unkeyed: u32,
    /// Batches in flight that the producer's own node routes.
    unrouted: InFlightCount,
    /// Per partition: the link address its batches last went to ("" for
    /// the producer's own client) and how many are in flight there.
    partitions: HashMap<u32, (String, InFlightCount)>,
}

impl TopicRoutes {
    fn new() -> TopicRoutes {
        TopicRoutes {
            asked: None,
            leaders: Vec::new(),
            next_unkeyed: 0,
            unrouted: new_count(),
            partitions: HashMap::new(),
        }
    }
}

enum Link {
    Open(Client),
    /// Could not be opened; not tried again before this.
    Failed(Instant),
}

/// The producer's connections to other nodes, by client address.
#[derive(Default)]
struct Links(HashMap<String, Link>);

/// A producer's routes and links (see the module docs).
pub(crate) struct Routing {
    client: Client,
    topics: HashMap<String, TopicRoutes>,
    links: Links,
    /// Set by a routed batch that failed: ask every topic's leaders again.
    stale: Arc<AtomicBool>,
}

impl Routing {
    pub(crate) fn new(client: Client) -> Routing {
        Routing {
            client,
            topics: HashMap::new(),
            links: Links::default(),
            stale: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The flag a failed routed batch sets.
    pub(crate) fn stale_flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.stale)
    }

    /// Chooses the route of one batch of `topic` whose partition is
    /// `partition` (explicit, or placed by its key), waiting as the order
    /// rule (module docs) says.
    pub(crate) async fn route(
        &mut self,
        topic: &str,
        partition: Option<u32>,
        records: &[ProduceRecord],
    ) -> Route {
        if self.stale.swap(false, Ordering::AcqRel) {
            for routes in self.topics.values_mut() {
                routes.asked = None;
            }
        }
        let routes = self
            .topics
            .entry(topic.to_string())
            .or_insert_with(TopicRoutes::new);
        let fresh = routes
            .asked
            .is_some_and(|asked| asked.elapsed() < ROUTES_MAX_AGE);
        let mut partitions_learned = None;
        if !fresh {
            let asking = self.client.partition_leaders(topic);
            let leaders = match tokio::time::timeout(ASK_TIMEOUT, asking).await {
                Ok(Ok(leaders)) => leaders,
                _ => Vec::new(),
            };
            if !leaders.is_empty() && leaders.len() != routes.leaders.len() {
                partitions_learned = Some(leaders.len() as u32);
            }
            routes.leaders = leaders;
            routes.asked = Some(Instant::now());
        }
        let count = routes.leaders.len() as u32;
        let partition = match partition {
            Some(partition) => Some(partition),
            None if count > 0 && records.iter().all(|record| record.key.is_none()) => {
                let next = routes.next_unkeyed % count;
                routes.next_unkeyed = routes.next_unkeyed.wrapping_add(1);
                Some(next)
            }
            None => None,
        };
        // The producer's own node, if it leads, needs no link.
        let own = match &*self.client.shared().state.borrow() {
            ConnState::Connected(conn) => conn.hello.broker_id.parse::<u64>().ok(),
            _ => None,
        };
        let address = partition
            .and_then(|p| routes.leaders.get(p as usize))
            .filter(|leader| Some(leader.node_id) != own)
            .map(|leader| leader.address.clone())
            .unwrap_or_default();
        let link = if address.is_empty() {
            None
        } else {
            self.links.open(&self.client, &self.stale, &address).await
        };
        let via = if link.is_some() {
            address
        } else {
            String::new()
        };
        let order = match partition {
            None => {
                // Through the producer's own node: after every batch in
                // flight on another connection.
                for (link, count) in routes.partitions.values() {
                    if !link.is_empty() {
                        wait_idle(count).await;
                    }
                }
                Counted::start(&routes.unrouted)
            }
            Some(partition) => {
                if !via.is_empty() {
                    wait_idle(&routes.unrouted).await;
                }
                let (last, count) = routes
                    .partitions
                    .entry(partition)
                    .or_insert_with(|| (via.clone(), new_count()));
                if *last != via {
                    wait_idle(count).await;
                    last.clone_from(&via);
                }
                Counted::start(count)
            }
        };
        Route {
            link,
            partition,
            order,
            partitions_learned,
        }
    }
}

impl Links {
    /// A connected link to `address`, if one is or can be opened now (with
    /// `client`'s options); one reconnecting sets `stale`.
    async fn open(&mut self, client: &Client, stale: &AtomicBool, address: &str) -> Option<Client> {
        match self.0.get(address) {
            Some(Link::Open(client)) => {
                if matches!(&*client.shared().state.borrow(), ConnState::Connected(_)) {
                    return Some(client.clone());
                }
                // Reconnecting (the node may be down): through our own
                // node meanwhile, and ask who leads now.
                stale.store(true, Ordering::Release);
                return None;
            }
            Some(Link::Failed(until)) if Instant::now() < *until => return None,
            _ => {}
        }
        let options = client.options().clone();
        match tokio::time::timeout(ASK_TIMEOUT, Client::connect(address, options)).await {
            Ok(Ok(client)) => {
                self.0
                    .insert(address.to_string(), Link::Open(client.clone()));
                Some(client)
            }
            _ => {
                self.0.insert(
                    address.to_string(),
                    Link::Failed(Instant::now() + LINK_RETRY_AFTER),
                );
                None
            }
        }
    }
}
