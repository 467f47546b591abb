//! The per-grant metric series of a scrape: readiness and expiry from the grant cache (each
//! grant's status as the watch shows it), renewal counts from the controller's memory.

use std::ops::Range;
use std::sync::Arc;

use kube::runtime::reflector;

use super::grant::Grant;
use super::memory::Memory;
use super::status;
use crate::metrics::{GrantSample, GrantSeries, GrantSnapshot};

pub(super) struct Series {
    grants: reflector::Store<Grant>,
    memory: Arc<Memory>,
}

impl Series {
    pub(super) fn new(grants: reflector::Store<Grant>, memory: Arc<Memory>) -> Self {
        Self { grants, memory }
    }
}

impl GrantSeries for Series {
    fn snapshot(&self) -> Box<dyn GrantSnapshot> {
        let mut grants = self.grants.state();
        grants.sort_unstable_by(|a, b| {
            (a.metadata.namespace.as_deref(), a.metadata.name.as_deref())
                .cmp(&(b.metadata.namespace.as_deref(), b.metadata.name.as_deref()))
        });
        Box::new(Snapshot { grants, memory: self.memory.clone() })
    }
}

struct Snapshot {
    grants: Vec<Arc<Grant>>,
    memory: Arc<Memory>,
}

impl GrantSnapshot for Snapshot {
    fn len(&self) -> usize {
        self.grants.len()
    }

    fn visit(&self, range: Range<usize>, refreshes: bool, each: &mut dyn FnMut(GrantSample<'_>)) {
        let grants = &self.grants[range];
        let counts = match refreshes {
            true => self.memory.refresh_counts(grants.iter().map(|g| g.key())),
            false => vec![[0; 3]; grants.len()],
        };
        for (grant, refreshes) in grants.iter().zip(counts) {
            let status = grant.status.as_ref();
            each(GrantSample {
                namespace: grant.metadata.namespace.as_deref().unwrap_or_default(),
                name: grant.metadata.name.as_deref().unwrap_or_default(),
                ready: status::previous_ready(status).is_some_and(|c| c.status == "True"),
                expires_at: status.and_then(|s| s.expires_at.as_ref()).map(|t| t.0.as_second()),
                refreshes,
            });
        }
    }
}
