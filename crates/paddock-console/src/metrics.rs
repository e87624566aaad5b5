//! Prometheus metrics of the API server, served at `/metrics` in the OpenMetrics text format.
//!
//! Role: count what the server does, so an operator sees load and failures without logs.
//!
//! Contract: `paddock_http_requests_total{method,route,status}` (route is the matched route
//! template, never a concrete path, so cardinality stays bounded),
//! `paddock_websocket_sessions_total{console}` and `paddock_websocket_sessions_active{console}`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// The content type of [`Metrics::encode`]'s output.
pub const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: String,
    route: String,
    status: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SessionLabels {
    console: String,
}

/// The server's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    sessions: Family<SessionLabels, Counter>,
    active_sessions: Family<SessionLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Empty metrics, registered.
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let sessions = Family::<SessionLabels, Counter>::default();
        let active_sessions = Family::<SessionLabels, Gauge>::default();
        registry.register(
            "paddock_http_requests",
            "HTTP requests by method, matched route and status code",
            requests.clone(),
        );
        registry.register(
            "paddock_websocket_sessions",
            "Console websocket sessions opened, by console (serial, vnc)",
            sessions.clone(),
        );
        registry.register(
            "paddock_websocket_sessions_active",
            "Console websocket sessions open now, by console (serial, vnc)",
            active_sessions.clone(),
        );
        Metrics {
            registry,
            requests,
            sessions,
            active_sessions,
        }
    }

    /// Counts one answered request.
    pub fn request(&self, method: &str, route: &str, status: u16) {
        self.requests
            .get_or_create(&RequestLabels {
                method: method.to_string(),
                route: route.to_string(),
                status: status.to_string(),
            })
            .inc();
    }

    /// Counts a console session that opened.
    pub fn session_opened(&self, console: &str) {
        let labels = SessionLabels {
            console: console.to_string(),
        };
        self.sessions.get_or_create(&labels).inc();
        self.active_sessions.get_or_create(&labels).inc();
    }

    /// Counts a console session that closed.
    pub fn session_closed(&self, console: &str) {
        self.active_sessions
            .get_or_create(&SessionLabels {
                console: console.to_string(),
            })
            .dec();
    }

    /// The metrics in the OpenMetrics text format.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}
