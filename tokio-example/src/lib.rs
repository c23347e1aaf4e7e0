//! Not a library: the package of the tokio example (`examples/axum_server.rs`), which
//! keeps tokio, hyper and axum out of the main package's build. Its library holds the
//! main crate's tokio guide, `docs/tokio.md`, as doctests; the main crate shows the
//! guide in its docs without compiling it.

/// The tokio guide's examples, compiled (and run, unless `no_run`) as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../docs/tokio.md")]
struct TokioGuide;
