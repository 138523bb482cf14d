//! The web dashboard's files, embedded in the binary: plain HTML, CSS and JavaScript
//! (no build step) and uPlot, vendored from npm (`scripts/vendor-uplot.sh`).

/// One embedded file.
#[derive(Debug, Clone, Copy)]
pub struct Asset {
    /// Path under the web root.
    pub path: &'static str,
    /// Content type.
    pub content_type: &'static str,
    /// Body.
    pub body: &'static str,
}

/// The page itself (served for `/` and every page of the single-page app).
pub const INDEX: Asset = Asset {
    path: "/",
    content_type: "text/html; charset=utf-8",
    body: include_str!("../web/index.html"),
};

/// Scripts, styles and the chart library.
pub const ASSETS: &[Asset] = &[
    Asset {
        path: "/assets/app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("../web/app.js"),
    },
    Asset {
        path: "/assets/app.css",
        content_type: "text/css; charset=utf-8",
        body: include_str!("../web/app.css"),
    },
    Asset {
        path: "/assets/uPlot.iife.min.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("../web/vendor/uPlot.iife.min.js"),
    },
    Asset {
        path: "/assets/uPlot.min.css",
        content_type: "text/css; charset=utf-8",
        body: include_str!("../web/vendor/uPlot.min.css"),
    },
];

/// The asset at `path`.
pub fn asset(path: &str) -> Option<&'static Asset> {
    ASSETS.iter().find(|a| a.path == path)
}
