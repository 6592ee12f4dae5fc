//! Terms: every leadership (a GTM promotion, a CMServer election) has a number, and
//! every order carries the term it was issued in, so that an order from a deposed
//! leader is recognisably stale and rejected.

use serde::{Deserialize, Serialize};

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct Term(pub u64);

impl Term {
    pub fn next(self) -> Term {
        Term(self.0 + 1)
    }

    /// Whether a message stamped with `msg` may be obeyed by someone at `self`.
    pub fn accepts(self, msg: Term) -> bool {
        msg >= self
    }
}

impl std::fmt::Display for Term {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn older_terms_are_rejected() {
        let mine = Term(5);
        assert!(mine.accepts(Term(5)));
        assert!(mine.accepts(Term(6)));
        assert!(!mine.accepts(Term(4)));
        assert_eq!(mine.next(), Term(6));
    }
}
