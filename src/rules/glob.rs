//! Command globs: `*` matches any run of characters (including none); everything else is literal.

/// A compiled command pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Glob {
    pattern: String,
}

impl Glob {
    pub fn new(pattern: &str) -> Glob {
        Glob {
            pattern: pattern.to_string(),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.pattern
    }

    /// Linear-time match: on a mismatch, backtrack only to the last `*` seen.
    pub fn matches(&self, text: &str) -> bool {
        let p = self.pattern.as_bytes();
        let t = text.as_bytes();
        let (mut pi, mut ti) = (0usize, 0usize);
        let mut star: Option<(usize, usize)> = None;
        while ti < t.len() {
            if pi < p.len() && p[pi] == b'*' {
                star = Some((pi, ti));
                pi += 1;
            } else if pi < p.len() && p[pi] == t[ti] {
                pi += 1;
                ti += 1;
            } else if let Some((sp, st)) = star {
                pi = sp + 1;
                ti = st + 1;
                star = Some((sp, st + 1));
            } else {
                return false;
            }
        }
        p[pi..].iter().all(|&c| c == b'*')
    }
}

#[cfg(test)]
mod tests {
    use super::Glob;

    #[test]
    fn literal_and_star() {
        let g = Glob::new("Group.CallbackAfter*");
        assert!(g.matches("Group.CallbackAfterGroupInfoChanged"));
        assert!(g.matches("Group.CallbackAfter"));
        assert!(!g.matches("Group.CallbackBeforeSendMsg"));
        assert!(!g.matches("XGroup.CallbackAfterX"));
        assert!(Glob::new("*").matches(""));
        assert!(Glob::new("*").matches("anything"));
        assert!(Glob::new("Profile.CallbackPortraitSet").matches("Profile.CallbackPortraitSet"));
        assert!(!Glob::new("Profile.CallbackPortraitSet").matches("Profile.CallbackPortraitSetX"));
        assert!(Glob::new("*Before*Msg").matches("C2C.CallbackBeforeSendMsg"));
        assert!(!Glob::new("*Before*Msg").matches("C2C.CallbackBeforeSendMsgX"));
        assert!(Glob::new("a*b*c").matches("aXbYbZc"));
        assert!(!Glob::new("a*b*c").matches("aXbYbZ"));
        assert!(Glob::new("").matches(""));
        assert!(!Glob::new("").matches("x"));
    }

    #[test]
    fn pathological_pattern_is_fast() {
        let g = Glob::new("*a*a*a*a*a*a*a*a*b");
        let text = "a".repeat(10_000);
        assert!(!g.matches(&text));
    }
}
