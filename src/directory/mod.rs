//! The directory on etcd (`[directory]`): the replay store shared by every
//! replica of a service (`replay`), and the transport of signed key-set
//! documents (publisher and watcher). etcd is only a relay: everything
//! read from it is verified before use, and its absence fails one-time
//! claims closed.

mod etcd;
mod replay;

pub(crate) use self::etcd::{EtcdSetupError, connect};
pub(crate) use self::replay::EtcdReplay;
