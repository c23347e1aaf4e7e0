//! Not a library: the package of the examples with dependencies of their own
//! (`examples/axum_server/`: tokio, hyper, axum; `examples/ws_server/`: tungstenite),
//! which keeps them out of the main package's build. Its library holds the main crate's
//! guides that use them, `docs/tokio.md` and `docs/handover.md`, as doctests; the main
//! crate shows the guides in its docs without compiling them.

/// The tokio guide's examples, compiled (and run, unless `no_run`) as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../docs/tokio.md")]
struct TokioGuide;

/// The handover guide's examples, compiled as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../docs/handover.md")]
struct HandoverGuide;
