//! Target URL templates: `{command}`, `{source}` and `{route}` filled in per delivery.

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

/// Characters kept as they are in a placeholder's value: RFC 3986 unreserved.
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    Text(String),
    Command,
    Source,
    Route,
}

/// A parsed URL template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UrlTemplate {
    raw: String,
    parts: Vec<Part>,
}

/// The values placeholders are filled with.
pub struct UrlVars<'a> {
    pub command: &'a str,
    pub source: &'a str,
    pub route: &'a str,
}

impl UrlTemplate {
    /// Parses and checks the template: known placeholders only, and an absolute http(s) URL.
    pub fn parse(raw: &str) -> Result<UrlTemplate, String> {
        let mut parts = Vec::new();
        let mut rest = raw;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_string()));
            }
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| format!("unclosed `{{` in url `{raw}`"))?;
            let name = &rest[open + 1..open + close];
            parts.push(match name {
                "command" => Part::Command,
                "source" => Part::Source,
                "route" => Part::Route,
                other => {
                    return Err(format!(
                        "unknown placeholder `{{{other}}}` in url (known: {{command}}, {{source}}, {{route}})"
                    ))
                }
            });
            rest = &rest[open + close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_string()));
        }
        let template = UrlTemplate {
            raw: raw.to_string(),
            parts,
        };
        let sample = template.render(&UrlVars {
            command: "c",
            source: "s",
            route: "r",
        });
        let url = reqwest::Url::parse(&sample).map_err(|e| format!("`{raw}` is not a URL: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!("url `{raw}` must start with http:// or https://"));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(format!("url `{raw}` has no host"));
        }
        Ok(template)
    }

    pub fn as_str(&self) -> &str {
        &self.raw
    }

    /// Fills in the placeholders, each URL-encoded as one component.
    pub fn render(&self, vars: &UrlVars<'_>) -> String {
        let mut out = String::with_capacity(self.raw.len() + 32);
        for part in &self.parts {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Command => out.extend(utf8_percent_encode(vars.command, COMPONENT)),
                Part::Source => out.extend(utf8_percent_encode(vars.source, COMPONENT)),
                Part::Route => out.extend(utf8_percent_encode(vars.route, COMPONENT)),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fills_and_encodes_placeholders() {
        let t =
            UrlTemplate::parse("http://profile.internal:7001/im/{command}?src={source}&r={route}")
                .unwrap();
        let url = t.render(&UrlVars {
            command: "Profile.CallbackPortraitSet",
            source: "tencent im",
            route: "a/b?c",
        });
        assert_eq!(
            url,
            "http://profile.internal:7001/im/Profile.CallbackPortraitSet?src=tencent%20im&r=a%2Fb%3Fc"
        );
        let t = UrlTemplate::parse("http://h/x").unwrap();
        assert_eq!(
            t.render(&UrlVars {
                command: "",
                source: "",
                route: ""
            }),
            "http://h/x"
        );
    }

    #[test]
    fn rejects_bad_templates() {
        assert!(UrlTemplate::parse("http://h/{nope}")
            .unwrap_err()
            .contains("nope"));
        assert!(UrlTemplate::parse("http://h/{command").is_err());
        assert!(UrlTemplate::parse("ftp://h/x").is_err());
        assert!(UrlTemplate::parse("not a url").is_err());
        assert!(UrlTemplate::parse("/relative/{command}").is_err());
    }
}
