//! The directory on etcd (`[directory]`): the replay store shared by every
//! replica of a service (`replay`), and the transport of signed key-set
//! documents: each instance publishes its own (`publish`), every verifier
//! follows the prefix (`watch`) and hands each value to the verifier of
//! documents before anything is trusted. etcd is only a relay: it can
//! delay or withhold documents, never forge or roll them back; and its
//! absence fails one-time claims closed. `state` tells health and metrics
//! whether the directory is stale.

mod etcd;
// Wired to the key-set documents once they land (issue 10, part A).
#[allow(dead_code, unused_imports)]
mod publish;
mod replay;
#[allow(dead_code, unused_imports)]
mod state;
#[allow(dead_code, unused_imports)]
mod watch;

pub(crate) use self::etcd::{EtcdSetupError, connect};
#[allow(unused_imports)]
pub(crate) use self::publish::{Documents, Publisher};
pub(crate) use self::replay::EtcdReplay;
#[allow(unused_imports)]
pub(crate) use self::state::DirectoryState;
#[allow(unused_imports)]
pub(crate) use self::watch::{DirectorySink, SinkFuture, Watcher};
