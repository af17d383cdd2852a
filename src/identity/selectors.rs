//! Selector sets: the identity of a workload the agent cannot attest itself (a pod, by its
//! CSI volume), handed to the Delegated Identity API as "treated as attested" (PI-4).

use std::fmt;
use std::sync::Arc;

use spire_api::pb::spire::api::types::Selector as ProtoSelector;

/// One SPIRE selector, `type:value` (e.g. `k8s` and `ns:apps`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Selector {
    pub kind: String,
    pub value: String,
}

impl Selector {
    pub fn new(kind: impl Into<String>, value: impl Into<String>) -> Self {
        Self {
            kind: kind.into(),
            value: value.into(),
        }
    }

    /// A `k8s` selector: `k8s("ns", "apps")` is `k8s:ns:apps`.
    pub fn k8s(name: &str, value: &str) -> Self {
        Self::new("k8s", format!("{name}:{value}"))
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind, self.value)
    }
}

/// A sorted, duplicate-free set of selectors; cheap to clone and usable as a map key (the
/// cache shares one subscription among everyone who asks with the same set).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SelectorSet(Arc<[Selector]>);

impl SelectorSet {
    pub fn new(mut selectors: Vec<Selector>) -> Self {
        selectors.sort();
        selectors.dedup();
        Self(selectors.into())
    }

    pub fn iter(&self) -> impl Iterator<Item = &Selector> {
        self.0.iter()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The request form of the Delegated Identity API (PI-2).
    pub fn to_proto(&self) -> Vec<ProtoSelector> {
        self.0
            .iter()
            .map(|s| ProtoSelector {
                r#type: s.kind.clone(),
                value: s.value.clone(),
            })
            .collect()
    }
}

impl fmt::Display for SelectorSet {
    /// `k8s:ns:apps, k8s:sa:db`: what an operator compares with `spire-server entry show`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, selector) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{selector}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for SelectorSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SelectorSet[{self}]")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_are_sorted_deduplicated_and_print_as_spire_does() {
        let set = SelectorSet::new(vec![
            Selector::k8s("sa", "db"),
            Selector::k8s("ns", "apps"),
            Selector::k8s("sa", "db"),
        ]);
        assert_eq!(set.len(), 2);
        assert_eq!(set.to_string(), "k8s:ns:apps, k8s:sa:db");
        assert_eq!(set.to_proto()[0].r#type, "k8s");
        assert_eq!(set.to_proto()[0].value, "ns:apps");
        let same = SelectorSet::new(vec![Selector::k8s("ns", "apps"), Selector::k8s("sa", "db")]);
        assert_eq!(set, same);
    }
}
