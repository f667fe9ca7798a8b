//! Which stores a collection asks: its [`Target`], checked once when the collection is created
//! and compiled into a [`Matcher`].

use shared::ClientId;
use shared::api::collections::{MAX_TARGET_IDS, Target};
use shared::labels::{Label, Labels};

/// A target that was checked: a glob that compiles, labels that parse, not too many ids.
#[derive(Debug, Clone)]
pub struct Matcher {
    target: Target,
    rule: Rule,
}

#[derive(Debug, Clone)]
enum Rule {
    All,
    Ids(std::collections::BTreeSet<ClientId>),
    Glob(glob::Pattern),
    Labels(Vec<Label>),
}

impl Matcher {
    /// Checks `target`. The error says what is wrong, for the operator.
    pub fn new(target: Target) -> Result<Self, String> {
        let rule = match &target {
            Target::All => Rule::All,
            Target::Ids { client_ids } => {
                if client_ids.is_empty() {
                    return Err("an ids target needs at least one client id".into());
                }
                if client_ids.len() > MAX_TARGET_IDS {
                    return Err(format!("at most {MAX_TARGET_IDS} client ids"));
                }
                Rule::Ids(client_ids.iter().cloned().collect())
            }
            Target::Glob { pattern } => {
                if pattern.is_empty() || pattern.len() > 256 {
                    return Err("a glob must be 1 to 256 characters".into());
                }
                Rule::Glob(
                    glob::Pattern::new(pattern)
                        .map_err(|e| format!("glob {pattern:?}: {}", e.msg))?,
                )
            }
            Target::Labels { labels } => {
                if labels.is_empty() {
                    return Err("a labels target needs at least one key=value".into());
                }
                let parsed = labels
                    .iter()
                    .map(|l| l.parse::<Label>().map_err(|e| e.to_string()))
                    .collect::<Result<Vec<_>, _>>()?;
                // Duplicates and the count are checked as for an agent's own labels.
                Labels::from_list(parsed.clone()).map_err(|e| e.to_string())?;
                Rule::Labels(parsed)
            }
        };
        Ok(Self { target, rule })
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    pub fn matches(&self, client_id: &ClientId, labels: &Labels) -> bool {
        match &self.rule {
            Rule::All => true,
            Rule::Ids(ids) => ids.contains(client_id),
            Rule::Glob(pattern) => pattern.matches_with(
                client_id.as_str(),
                glob::MatchOptions {
                    case_sensitive: true,
                    require_literal_separator: false,
                    require_literal_leading_dot: false,
                },
            ),
            Rule::Labels(wanted) => labels.matches_all(wanted),
        }
    }

    /// The stores a target names outright, seen or not.
    pub fn named(&self) -> impl Iterator<Item = &ClientId> {
        match &self.rule {
            Rule::Ids(ids) => Some(ids.iter()),
            _ => None,
        }
        .into_iter()
        .flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> ClientId {
        ClientId::parse(s).unwrap()
    }

    fn labels(list: &[&str]) -> Labels {
        Labels::from_list(list.iter().map(|l| l.parse().unwrap())).unwrap()
    }

    #[test]
    fn each_kind_of_target_matches_exactly_its_stores() {
        let none = labels(&[]);
        let glob = Matcher::new(Target::Glob {
            pattern: "restaurant-*".into(),
        })
        .unwrap();
        assert!(glob.matches(&id("restaurant-1"), &none));
        assert!(!glob.matches(&id("shop-1"), &none));
        assert!(!glob.matches(&id("Restaurant-1"), &none), "case matters");
        let q = Matcher::new(Target::Glob {
            pattern: "store-?[0-4]".into(),
        })
        .unwrap();
        assert!(q.matches(&id("store-a3"), &none));
        assert!(!q.matches(&id("store-a7"), &none));

        let by_label = Matcher::new(Target::Labels {
            labels: vec!["region=north".into(), "brand=x".into()],
        })
        .unwrap();
        assert!(by_label.matches(&id("a"), &labels(&["region=north", "brand=x", "k=v"])));
        assert!(
            !by_label.matches(&id("a"), &labels(&["region=north"])),
            "all must hold"
        );

        let ids = Matcher::new(Target::Ids {
            client_ids: vec![id("a"), id("b")],
        })
        .unwrap();
        assert!(ids.matches(&id("b"), &none));
        assert!(!ids.matches(&id("c"), &none));
        assert_eq!(ids.named().count(), 2);
        assert!(Matcher::new(Target::All).unwrap().matches(&id("z"), &none));
    }

    #[test]
    fn bad_targets_are_refused_with_a_reason() {
        for bad in [
            Target::Glob {
                pattern: "restaurant-[".into(),
            },
            Target::Glob { pattern: "".into() },
            Target::Labels { labels: vec![] },
            Target::Labels {
                labels: vec!["no-equals".into()],
            },
            Target::Labels {
                labels: vec!["a=1".into(), "a=2".into()],
            },
            Target::Ids { client_ids: vec![] },
        ] {
            let err = Matcher::new(bad.clone()).unwrap_err();
            assert!(!err.is_empty(), "{bad:?}");
        }
    }
}
