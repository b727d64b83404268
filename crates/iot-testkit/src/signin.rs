//! A person at a browser, for OIDC logins in tests: follows redirects with a cookie
//! jar, fills in the stand-in's sign-in form, and submits the confirmation forms
//! that `oidc-provider` shows in the device-code flow. No JavaScript, no rendering:
//! the stand-in's pages are plain HTML forms, and the browser tests of the
//! dashboard use real Chromium.

use std::path::Path;

/// One HTML form: where it posts and its prefilled fields.
#[derive(Debug, Clone)]
struct Form {
    action: String,
    fields: Vec<(String, String)>,
    has_password: bool,
}

pub struct SignIn {
    http: reqwest::Client,
}

/// What the person saw at the end.
#[derive(Debug)]
pub struct Outcome {
    pub status: u16,
    pub url: String,
    pub body: String,
}

impl SignIn {
    /// A fresh browser profile (empty cookie jar) trusting `ca_file`.
    pub fn new(ca_file: &Path) -> anyhow::Result<Self> {
        let pem = std::fs::read(ca_file)?;
        let http = reqwest::Client::builder()
            .cookie_store(true)
            .add_root_certificate(reqwest::Certificate::from_pem(&pem)?)
            .timeout(std::time::Duration::from_secs(20))
            .build()?;
        Ok(Self { http })
    }

    /// Opens `url` and goes through every form on the way: the sign-in form gets
    /// `username` and `password`, a confirmation form is accepted as shown. Ends
    /// on the first page without a form (the login's result), or on an error page.
    pub async fn complete(&self, url: &str, username: &str, password: &str) -> anyhow::Result<Outcome> {
        let mut response = self.http.get(url).send().await?;
        for _ in 0..8 {
            let status = response.status().as_u16();
            let here = response.url().clone();
            let body = response.text().await?;
            let Some(form) = forms(&body).into_iter().next() else {
                return Ok(Outcome {
                    status,
                    url: here.to_string(),
                    body,
                });
            };
            if status >= 400 && !form.has_password {
                return Ok(Outcome {
                    status,
                    url: here.to_string(),
                    body,
                });
            }
            let mut fields = form.fields.clone();
            if form.has_password {
                if status == 401 {
                    // The form came back with an error: the credentials were refused.
                    return Ok(Outcome {
                        status,
                        url: here.to_string(),
                        body,
                    });
                }
                fields.retain(|(k, _)| k != "username" && k != "password");
                fields.push(("username".into(), username.into()));
                fields.push(("password".into(), password.into()));
            }
            let action = here.join(&form.action)?;
            response = self.http.post(action).form(&fields).send().await?;
        }
        anyhow::bail!("the sign-in did not finish within 8 forms")
    }
}

fn forms(html: &str) -> Vec<Form> {
    let mut out = Vec::new();
    let mut rest = html;
    while let Some(start) = rest.find("<form") {
        let after = &rest[start..];
        let tag_end = after.find('>').unwrap_or(after.len());
        let tag = &after[..tag_end];
        let end = after.find("</form>").unwrap_or(after.len());
        let inner = &after[tag_end.min(end)..end];
        let id = attr(tag, "id");
        let mut fields = Vec::new();
        let mut has_password = false;
        // Inputs inside the form, and those elsewhere that name it with form="id"
        // (oidc-provider's device pages put the user's fields outside the form).
        let outside: Vec<&str> = match &id {
            Some(id) => tags(html, "<input")
                .into_iter()
                .filter(|t| attr(t, "form").as_deref() == Some(id.as_str()))
                .collect(),
            None => Vec::new(),
        };
        for input in tags(inner, "<input").into_iter().chain(outside) {
            if attr(input, "type").as_deref() == Some("password") {
                has_password = true;
            }
            if let Some(name) = attr(input, "name") {
                fields.push((name, attr(input, "value").unwrap_or_default()));
            }
        }
        out.push(Form {
            action: attr(tag, "action").unwrap_or_default(),
            fields,
            has_password,
        });
        rest = &after[end.min(after.len())..];
        if end == after.len() {
            break;
        }
        rest = &rest["</form>".len().min(rest.len())..];
    }
    out
}

fn tags<'a>(html: &'a str, open: &str) -> Vec<&'a str> {
    let mut out = Vec::new();
    let mut rest = html;
    while let Some(i) = rest.find(open) {
        let t = &rest[i..];
        let end = t.find('>').map_or(t.len(), |e| e + 1);
        out.push(&t[..end]);
        rest = &t[end..];
    }
    out
}

fn attr(tag: &str, name: &str) -> Option<String> {
    let needle = format!(" {name}=\"");
    let i = tag.find(&needle)? + needle.len();
    let v = &tag[i..];
    let end = v.find('"')?;
    Some(
        v[..end]
            .replace("&quot;", "\"")
            .replace("&#34;", "\"")
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&amp;", "&"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_hidden_fields_inside_and_outside_the_form() {
        let html = r#"<p>x</p><form id="op.deviceInputForm" method="post" action="/device">
            <input type="hidden" name="xsrf" value="a&amp;b"/></form>
            <input id="user_code" name="user_code" form="op.deviceInputForm">
            <form method="post" action="/interaction/u1/login"><input name="username" value="">
            <input name="password" type="password"></form>"#;
        let f = forms(html);
        assert_eq!(f.len(), 2);
        assert_eq!(f[0].action, "/device");
        assert_eq!(
            f[0].fields,
            vec![("xsrf".into(), "a&b".into()), ("user_code".into(), String::new())]
        );
        assert!(!f[0].has_password && f[1].has_password);
    }
}
