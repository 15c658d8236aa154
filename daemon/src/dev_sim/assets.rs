//! The simulator's own page, compiled into the binary so `dev-sim` needs no Node.js and reads
//! nothing from the network at run time. The sources are in `sim/` at the repository's root; the
//! bundles under `sim/dist/` are built from them by `npm run build` there and committed, and
//! `npm test` there fails when they no longer match their sources (docs/decisions.md).

/// One file the simulator serves: its bytes and its media type.
#[derive(Debug, Clone, Copy)]
pub struct Asset {
    pub body: &'static [u8],
    pub content_type: &'static str,
}

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";

/// The host panel (the page the developer opens).
pub const PANEL_HTML: Asset = Asset { body: include_bytes!("../../../sim/src/panel.html"), content_type: HTML };
/// The panel's stylesheet.
pub const PANEL_CSS: Asset = Asset { body: include_bytes!("../../../sim/src/panel.css"), content_type: CSS };
/// The panel's script (bundled from `sim/src/panel.ts`).
pub const PANEL_JS: Asset = Asset { body: include_bytes!("../../../sim/dist/panel.js"), content_type: JS };
/// The mini app frame's `wx` (bundled from `sim/src/bridge.ts` with the Node package's `createWx`).
pub const BRIDGE_JS: Asset = Asset { body: include_bytes!("../../../sim/dist/bridge.js"), content_type: JS };

/// The built-in sample app, served when no `--app-dir` is given: a button per API.
pub fn sample(path: &str) -> Option<Asset> {
    Some(match path {
        "index.html" => Asset { body: include_bytes!("../../../sim/sample/index.html"), content_type: HTML },
        "app.js" => Asset { body: include_bytes!("../../../sim/sample/app.js"), content_type: JS },
        "app.css" => Asset { body: include_bytes!("../../../sim/sample/app.css"), content_type: CSS },
        _ => return None,
    })
}

/// The media type of an app file, by its extension; anything unknown is served as bytes.
pub fn content_type(path: &str) -> &'static str {
    let ext = path.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase()).unwrap_or_default();
    match ext.as_str() {
        "html" | "htm" => HTML,
        "js" | "mjs" => JS,
        "css" => CSS,
        "json" => "application/json",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "svg" => "image/svg+xml",
        "ico" => "image/x-icon",
        "wasm" => "application/wasm",
        "txt" => "text/plain; charset=utf-8",
        "woff2" => "font/woff2",
        _ => "application/octet-stream",
    }
}
