//! The web console: the UI built from `web/` (TypeScript, bundled with esbuild), embedded in the
//! binary and served under `/ui/`.
//!
//! Role: give `paddock serve` a browser UI with no files to install and nothing fetched at run
//! time (air-gapped machines), next to the API it uses.
//!
//! Contract:
//! - The assets are the committed build output `web/dist/` (`cd web && npm ci && npm run build`;
//!   `hack/check-generated.sh` rebuilds it and fails on drift), compiled in with `include_bytes!`.
//! - The UI is public static content: it holds no secret and shows nothing until the user gives
//!   the access token, which every API call it makes still needs. `/ui` redirects to `/ui/`;
//!   unknown files under `/ui/` are JSON 404s.
//! - Every UI response carries a strict Content-Security-Policy: scripts, styles, fonts and
//!   connections only from this origin (`'self'`, which covers the same-origin websockets), no
//!   inline script or style, no framing; plus `nosniff` and `no-referrer`, so the token in a
//!   websocket URL never leaks through a Referer header.
//! - [`console_url`] is the ready-to-click URL `paddock serve` prints: the token travels in the
//!   URL fragment, which browsers never send to a server, and the UI moves it into the tab's
//!   sessionStorage and out of the address bar.

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;

use crate::serve::ServeInfo;

/// Where the UI is served.
pub const UI_PATH: &str = "/ui/";

/// The policy of every UI response. `blob:` images are screenshots fetched with the token;
/// `data:` images are noVNC's cursor.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self' 'sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU='; img-src 'self' blob: data:; font-src 'self'; connect-src 'self'; manifest-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// One embedded file.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    bytes: &'static [u8],
}

/// The build output of `web/`, file by file (the build writes exactly these names).
const ASSETS: &[Asset] = &[
    Asset {
        name: "index.html",
        content_type: "text/html; charset=utf-8",
        bytes: include_bytes!("../../../web/dist/index.html"),
    },
    Asset {
        name: "app.js",
        content_type: "text/javascript; charset=utf-8",
        bytes: include_bytes!("../../../web/dist/app.js"),
    },
    Asset {
        name: "app.css",
        content_type: "text/css; charset=utf-8",
        bytes: include_bytes!("../../../web/dist/app.css"),
    },
    Asset {
        name: "favicon.svg",
        content_type: "image/svg+xml",
        bytes: include_bytes!("../../../web/dist/favicon.svg"),
    },
    Asset {
        name: "THIRD-PARTY-LICENSES.txt",
        content_type: "text/plain; charset=utf-8",
        bytes: include_bytes!("../../../web/dist/THIRD-PARTY-LICENSES.txt"),
    },
];

/// The names of the embedded files, for tests and diagnostics.
pub fn asset_names() -> Vec<&'static str> {
    ASSETS.iter().map(|asset| asset.name).collect()
}

/// The URL that opens the UI signed in: `<url>/ui/#token=<token>`.
pub fn console_url(info: &ServeInfo) -> String {
    format!("{}{UI_PATH}#token={}", info.url, info.token)
}

/// The routes of the UI; public (no token), merged into the API's router.
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/ui", get(|| async { Redirect::permanent(UI_PATH) }))
        .route(UI_PATH, get(|| async { asset("index.html") }))
        .route(
            "/ui/{file}",
            get(|Path(file): Path<String>| async move { asset(&file) }),
        )
}

fn asset(name: &str) -> Response {
    let Some(asset) = ASSETS.iter().find(|asset| asset.name == name) else {
        let body = crate::api::ErrorBody {
            code: StatusCode::NOT_FOUND.as_u16(),
            reason: "NotFound".to_string(),
            message: format!("the web console has no file {name}; open {UI_PATH}"),
        };
        return (StatusCode::NOT_FOUND, axum::Json(body)).into_response();
    };
    let mut response = asset.bytes.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(asset.content_type));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    // A new paddock binary may serve different files under the same names: always revalidate.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}
