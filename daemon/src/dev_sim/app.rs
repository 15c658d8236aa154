//! The mini app under test: its files (the developer's `--app-dir`, or the built-in sample) and
//! its app.json, which the version picker rewrites before each relaunch.

use std::{
    borrow::Cow,
    path::{Component, Path, PathBuf},
};

use super::{assets, error::DevSimError};

/// Largest app file served (an app page's scripts and images, not media libraries).
pub const MAX_APP_FILE_BYTES: u64 = 16 * 1024 * 1024;

/// The script tag the simulator puts first in the app page's `<head>`: it defines `wx`.
pub const BRIDGE_TAG: &str = "<script src=\"/sim/bridge.js\"></script>";

/// Where the mini app's page comes from.
#[derive(Debug, Clone)]
pub struct AppFiles {
    /// The developer's app directory (canonical), or `None` for the built-in sample.
    dir: Option<PathBuf>,
}

impl AppFiles {
    /// The files of `dir` (which must hold an `index.html`), or the sample app without one.
    pub fn new(dir: Option<&Path>) -> Result<AppFiles, DevSimError> {
        let Some(dir) = dir else { return Ok(AppFiles { dir: None }) };
        let canonical =
            dir.canonicalize().map_err(|e| DevSimError::Setup(format!("--app-dir {}: {e}", dir.display())))?;
        if !canonical.join("index.html").is_file() {
            return Err(DevSimError::Setup(format!(
                "--app-dir {}: no index.html (the page the simulator shows)",
                dir.display()
            )));
        }
        Ok(AppFiles { dir: Some(canonical) })
    }

    /// What the page calls itself in the panel.
    pub fn describe(&self) -> String {
        match &self.dir {
            Some(d) => d.display().to_string(),
            None => "built-in sample app".into(),
        }
    }

    /// The app.json in the app directory, if there is one.
    pub fn app_json_file(&self) -> Option<PathBuf> {
        self.dir.as_ref().map(|d| d.join("app.json")).filter(|p| p.is_file())
    }

    /// The file at `path` (relative, `/`-separated) and its media type; `index.html` (and any
    /// other `.html` page) gets the bridge script first in its head.
    pub fn read(&self, path: &str) -> Result<(Cow<'static, [u8]>, &'static str), DevSimError> {
        let path = if path.is_empty() { "index.html" } else { path };
        let relative = safe_relative(path).ok_or(DevSimError::NotFound)?;
        let (body, content_type): (Cow<'static, [u8]>, &'static str) = match &self.dir {
            None => {
                let asset = assets::sample(path).ok_or(DevSimError::NotFound)?;
                (Cow::Borrowed(asset.body), asset.content_type)
            }
            Some(root) => {
                let file = root.join(&relative).canonicalize().map_err(|_| DevSimError::NotFound)?;
                // A symlink may not lead out of the app directory.
                if !file.starts_with(root) || !file.is_file() {
                    return Err(DevSimError::NotFound);
                }
                let len = file.metadata().map_err(|_| DevSimError::NotFound)?.len();
                if len > MAX_APP_FILE_BYTES {
                    return Err(DevSimError::TooLarge(format!(
                        "{path} is {len} bytes; the simulator serves app files up to {MAX_APP_FILE_BYTES}"
                    )));
                }
                let bytes = std::fs::read(&file).map_err(|_| DevSimError::NotFound)?;
                (Cow::Owned(bytes), assets::content_type(path))
            }
        };
        if content_type.starts_with("text/html") {
            return Ok((Cow::Owned(inject_bridge(&body)), content_type));
        }
        Ok((body, content_type))
    }
}

/// `path` as a relative path of plain components, or `None` if it climbs out or is absolute.
fn safe_relative(path: &str) -> Option<PathBuf> {
    if path.contains('\\') || path.contains('\0') {
        return None;
    }
    let mut out = PathBuf::new();
    for c in Path::new(path).components() {
        match c {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            _ => return None,
        }
    }
    (!out.as_os_str().is_empty()).then_some(out)
}

/// The page with the bridge script as the first thing in its `<head>` (or at its very start when
/// it has none), so `wx` exists before any of the app's own scripts run.
pub fn inject_bridge(page: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(page);
    let lower = text.to_ascii_lowercase();
    let at = lower.find("<head").and_then(|h| lower[h..].find('>').map(|end| h + end + 1));
    let mut out = String::with_capacity(text.len() + BRIDGE_TAG.len());
    match at {
        Some(at) => {
            out.push_str(&text[..at]);
            out.push_str(BRIDGE_TAG);
            out.push_str(&text[at..]);
        }
        None => {
            out.push_str(BRIDGE_TAG);
            out.push_str(&text);
        }
    }
    out.into_bytes()
}

/// The app.json to launch with: `base` with `apiVersion` set to `version` (removed when empty).
pub fn with_version(base: &serde_json::Map<String, serde_json::Value>, version: &str) -> String {
    let mut json = base.clone();
    if version.is_empty() {
        json.remove("apiVersion");
    } else {
        json.insert("apiVersion".into(), serde_json::Value::String(version.to_owned()));
    }
    serde_json::Value::Object(json).to_string()
}

/// Parses an app.json text: it must be a JSON object.
pub fn parse_app_json(text: &str) -> Result<serde_json::Map<String, serde_json::Value>, DevSimError> {
    match serde_json::from_str(text) {
        Ok(serde_json::Value::Object(map)) => Ok(map),
        Ok(_) => Err(DevSimError::Setup("app.json must be a JSON object".into())),
        Err(e) => Err(DevSimError::Setup(format!("app.json is not JSON: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_that_climb_out_are_refused() {
        assert_eq!(safe_relative("js/app.js"), Some(PathBuf::from("js/app.js")));
        assert_eq!(safe_relative("./index.html"), Some(PathBuf::from("index.html")));
        for bad in ["../secret", "/etc/passwd", "a/../../b", "a\\..\\b", "", "."] {
            assert_eq!(safe_relative(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_bridge_comes_first_in_the_head() {
        let page = inject_bridge(b"<!doctype html><HTML><Head lang=x><script src=app.js></script></head>");
        let page = String::from_utf8(page).unwrap();
        assert!(page.starts_with(&format!("<!doctype html><HTML><Head lang=x>{BRIDGE_TAG}<script src=app.js>")));
        let bare = String::from_utf8(inject_bridge(b"<p>hi")).unwrap();
        assert_eq!(bare, format!("{BRIDGE_TAG}<p>hi"));
    }

    #[test]
    fn the_version_picker_sets_or_removes_api_version() {
        let base = parse_app_json(r#"{"pages":["index"],"apiVersion":"v1"}"#).unwrap();
        assert_eq!(with_version(&base, "v3"), r#"{"apiVersion":"v3","pages":["index"]}"#);
        assert_eq!(with_version(&base, ""), r#"{"pages":["index"]}"#);
        assert!(parse_app_json("[1]").is_err());
        assert!(parse_app_json("{").is_err());
    }

    #[test]
    fn an_app_dir_serves_its_files_and_nothing_outside() {
        let outer = tempfile::tempdir().unwrap();
        let dir = outer.path().join("app");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("index.html"), "<html><head></head></html>").unwrap();
        std::fs::write(dir.join("app.js"), "wx.login()").unwrap();
        std::fs::write(outer.path().join("secret.txt"), "no").unwrap();
        #[cfg(unix)]
        std::os::unix::fs::symlink(outer.path().join("secret.txt"), dir.join("link.txt")).unwrap();
        let files = AppFiles::new(Some(&dir)).unwrap();
        let (index, kind) = files.read("").unwrap();
        assert!(kind.starts_with("text/html"));
        assert!(String::from_utf8_lossy(&index).contains(BRIDGE_TAG));
        assert_eq!(&*files.read("app.js").unwrap().0, b"wx.login()");
        assert!(matches!(files.read("../secret.txt"), Err(DevSimError::NotFound)));
        assert!(matches!(files.read("link.txt"), Err(DevSimError::NotFound)));
        assert!(matches!(files.read("missing.js"), Err(DevSimError::NotFound)));
        assert!(AppFiles::new(Some(outer.path())).is_err(), "a dir without index.html is refused");
    }
}
