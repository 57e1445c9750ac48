//! Where the process's logs and spans go: stderr as text or JSON lines (`--log-format`),
//! filtered by `RUST_LOG` (default `info`), and, with `--otlp-endpoint`, the spans (each
//! request's `rpc` span among them) exported to an OpenTelemetry collector over OTLP/gRPC
//! in batches, from a small runtime of their own so export never competes with requests.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// The exporter's state; flushes what is left when dropped (at the process's end).
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    /// Runs the exporter's connection; kept until the provider is shut down.
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(error) = provider.shutdown()
        {
            eprintln!("spans not exported at exit: {error}");
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Installs the global subscriber: `json` or text lines on stderr, and spans to
/// `otlp_endpoint` (`http://collector:4317`) when given.
pub fn init(json: bool, otlp_endpoint: Option<&str>) -> Result<Telemetry, String> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let lines = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let lines = if json {
        lines.json().boxed()
    } else {
        lines.boxed()
    };
    let (provider, runtime) = match otlp_endpoint {
        Some(endpoint) => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("kpi-otlp")
                .enable_all()
                .build()
                .map_err(|error| format!("no runtime for the OTLP exporter: {error}"))?;
            let exporter = runtime
                .block_on(async {
                    opentelemetry_otlp::SpanExporter::builder()
                        .with_tonic()
                        .with_endpoint(endpoint)
                        .build()
                })
                .map_err(|error| format!("--otlp-endpoint {endpoint}: {error}"))?;
            let provider = SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(Resource::builder().with_service_name("kpi-server").build())
                .build();
            (Some(provider), Some(runtime))
        }
        None => (None, None),
    };
    let spans = provider
        .as_ref()
        .map(|provider| tracing_opentelemetry::layer().with_tracer(provider.tracer("kpi-server")));
    tracing_subscriber::registry()
        .with(filter)
        .with(lines)
        .with(spans)
        .try_init()
        .map_err(|error| error.to_string())?;
    Ok(Telemetry { provider, runtime })
}
