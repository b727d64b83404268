//! Builds a `Deployment` from flags with the typed `DeploymentSpec` and
//! `PodmanV0Score`, and applies it with server-side apply, deletes it, or prints it
//! as JSON for `kubectl apply -f -`. No YAML anywhere.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use harmony_reconciler_contracts::{DeploymentRef, Id, describe_problems, validate_score};
use iot_api::{
    Deployment, DeploymentSpec, IotScore, PodmanService, PodmanV0Score, PortMapping, Protocol, RestartPolicy, labels,
};
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::runtime::wait::{Condition, await_condition};
use kube::{Api, ResourceExt};

const FIELD_MANAGER: &str = "example_iot_apply_deployment";

#[derive(Debug, Parser)]
#[command(
    name = "example_iot_apply_deployment",
    about = "Apply, delete or print an iot.nationtech.io Deployment"
)]
struct Args {
    /// Resource name.
    #[arg(long, default_value = "web")]
    name: String,
    /// Resource namespace.
    #[arg(long, default_value = "default")]
    namespace: String,
    /// Device to run on (repeat for several).
    #[arg(long = "target-device", value_name = "DEVICE_ID", conflicts_with = "selector")]
    target_devices: Vec<String>,
    /// Run on every registered Device with this label, KEY=VALUE (repeat: all must
    /// hold), including devices labelled so later.
    #[arg(long = "selector", value_name = "KEY=VALUE", value_parser = parse_env)]
    selector: Vec<(String, String)>,
    /// Container image (must be on the device or pullable by it).
    #[arg(long)]
    image: Option<String>,
    /// Published port, HOST[:CONTAINER] (container port defaults to 80). Repeatable.
    #[arg(long = "port", value_name = "HOST[:CONTAINER]", value_parser = parse_port)]
    ports: Vec<PortMapping>,
    /// Environment variable KEY=VALUE. Repeatable.
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// Service (container) name inside the deployment.
    #[arg(long, default_value = "web")]
    service: String,
    /// Delete the resource instead of applying it.
    #[arg(long, conflicts_with = "print")]
    delete: bool,
    /// Print the resource as JSON instead of applying it.
    #[arg(long)]
    print: bool,
    /// After applying, wait until every target device runs the new spec.
    #[arg(long, value_parser = humantime::parse_duration)]
    wait: Option<Duration>,
}

fn parse_port(s: &str) -> Result<PortMapping, String> {
    let (host, container) = s.split_once(':').unwrap_or((s, "80"));
    let parse = |v: &str, what: &str| -> Result<u16, String> {
        match v.parse::<u16>() {
            Ok(p) if p > 0 => Ok(p),
            _ => Err(format!("{what} port {v:?} is not a number in 1-65535")),
        }
    };
    Ok(PortMapping {
        host_port: parse(host, "host")?,
        container_port: parse(container, "container")?,
        protocol: Protocol::Tcp,
    })
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("{s:?} is not KEY=VALUE"))?;
    Ok((k.to_owned(), v.to_owned()))
}

fn build(args: &Args) -> anyhow::Result<Deployment> {
    DeploymentRef::new(&args.namespace, &args.name).context("invalid --namespace/--name")?;
    anyhow::ensure!(
        !args.target_devices.is_empty() || !args.selector.is_empty(),
        "at least one --target-device or --selector is required"
    );
    for d in &args.target_devices {
        Id::new(d.as_str()).context("invalid --target-device")?;
    }
    let image = args
        .image
        .clone()
        .context("--image is required unless --delete is given")?;
    let score = IotScore::PodmanV0(PodmanV0Score {
        services: vec![PodmanService {
            name: args.service.clone(),
            image,
            ports: args.ports.clone(),
            env: args.env.iter().cloned().collect::<BTreeMap<_, _>>(),
            command: None,
            args: None,
            restart_policy: RestartPolicy::Always,
            resources: None,
        }],
    });
    let problems = validate_score(&score.to_wire());
    anyhow::ensure!(problems.is_empty(), "{}", describe_problems(&problems));
    let spec = if args.selector.is_empty() {
        DeploymentSpec::for_devices(args.target_devices.clone(), score)
    } else {
        let selector = iot_api::DeviceSelector {
            match_labels: args.selector.iter().cloned().collect(),
            ..Default::default()
        };
        DeploymentSpec::for_selector(selector, score)
    };
    let mut dep = Deployment::new(&args.name, spec);
    dep.metadata.namespace = Some(args.namespace.clone());
    dep.metadata.labels = Some(
        [
            (labels::NAME, args.name.as_str()),
            (labels::PART_OF, labels::PLATFORM),
            (labels::MANAGED_BY, FIELD_MANAGER),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect(),
    );
    Ok(dep)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.print {
        println!("{}", serde_json::to_string_pretty(&build(&args)?)?);
        return Ok(());
    }
    let dep = if args.delete { None } else { Some(build(&args)?) };
    let config = kube::Config::infer()
        .await
        .context("no Kubernetes API server configured (set KUBECONFIG)")?;
    let server = config.cluster_url.to_string();
    let client = kube::Client::try_from(config).context("cannot build a client for the Kubernetes API server")?;
    let api: Api<Deployment> = Api::namespaced(client, &args.namespace);
    match dep {
        None => match api.delete(&args.name, &DeleteParams::default()).await {
            Ok(_) => println!(
                "deployment.iot.nationtech.io/{} deleted (keys are removed by the operator)",
                args.name
            ),
            Err(kube::Error::Api(e)) if e.code == 404 => {
                anyhow::bail!(
                    "deployment.iot.nationtech.io/{} not found in namespace {} ({})",
                    args.name,
                    args.namespace,
                    crd_hint(&e.message)
                )
            }
            Err(e) => return Err(explain(e, &server)),
        },
        Some(dep) => {
            let applied = api
                .patch(
                    &args.name,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&dep),
                )
                .await
                .map_err(|e| explain(e, &server))?;
            println!(
                "deployment.iot.nationtech.io/{} applied (generation {})",
                applied.name_any(),
                applied.metadata.generation.unwrap_or(0)
            );
            if let Some(timeout) = args.wait {
                let generation = applied.metadata.generation.unwrap_or(0);
                let hash = applied.spec.score.spec_hash().to_string();
                wait_rolled_out(api, &args.name, generation, &hash, timeout).await?;
            }
        }
    }
    Ok(())
}

/// Every target runs the spec just applied: the aggregate was computed for this
/// generation *and* counts every device as running this spec hash. A summary left
/// over from the previous spec never satisfies it.
fn rolled_out(generation: i64, hash: String) -> impl Condition<Deployment> {
    move |obj: Option<&Deployment>| {
        obj.and_then(|d| d.status.as_ref())
            .and_then(|s| s.aggregate.as_ref())
            .is_some_and(|a| {
                a.observed_generation == Some(generation)
                    && a.spec_hash == hash
                    && a.targets > 0
                    && a.succeeded == a.targets
            })
    }
}

async fn wait_rolled_out(
    api: Api<Deployment>,
    name: &str,
    generation: i64,
    hash: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    let waited = tokio::time::timeout(
        timeout,
        await_condition(api.clone(), name, rolled_out(generation, hash.to_owned())),
    )
    .await;
    match waited {
        Ok(Ok(Some(d))) => {
            let agg = d.status.and_then(|s| s.aggregate).unwrap_or_default();
            println!(
                "rolled out: {}/{} devices running spec {}",
                agg.succeeded, agg.targets, agg.spec_hash
            );
            Ok(())
        }
        Ok(Ok(None)) => anyhow::bail!("deployment.iot.nationtech.io/{name} was deleted while waiting"),
        Ok(Err(e)) => anyhow::bail!("watching deployment.iot.nationtech.io/{name}: {e}"),
        Err(_) => {
            let now = api.get_opt(name).await.ok().flatten();
            let agg = now
                .as_ref()
                .and_then(|d| d.status.as_ref())
                .and_then(|s| s.aggregate.clone());
            match agg {
                Some(a) if a.observed_generation == Some(generation) && a.spec_hash == hash => {
                    let err = a
                        .last_error
                        .as_ref()
                        .map(|e| format!("; last error on {}: {}", e.device, e.message))
                        .unwrap_or_default();
                    anyhow::bail!(
                        "not rolled out after {timeout:?}: {} succeeded, {} failed, {} pending, {} unreported{err}",
                        a.succeeded,
                        a.failed,
                        a.pending,
                        a.unreported
                    )
                }
                _ => anyhow::bail!(
                    "no fleet summary for generation {generation} (spec {hash}) after {timeout:?}; is the operator running?"
                ),
            }
        }
    }
}

const CRD_MISSING: &str = "the Deployment CRD is not installed; run `iot-operator install`";

fn crd_hint(message: &str) -> String {
    // A server without the CRD answers either with a Status naming the resource or a
    // bare "404 page not found"; an object that is merely absent names itself.
    if message.contains("the server could not find the requested resource") || message.contains("page not found") {
        CRD_MISSING.into()
    } else {
        message.to_owned()
    }
}

fn explain(e: kube::Error, server: &str) -> anyhow::Error {
    match e {
        // Server-side apply creates missing objects, so a 404 means the type is unknown.
        kube::Error::Api(ae) if ae.code == 404 => anyhow::anyhow!("{CRD_MISSING}"),
        kube::Error::Api(ae) if ae.code == 422 => {
            anyhow::anyhow!("the API server rejected the resource: {}", ae.message)
        }
        // RBAC said no: the server's message names the user, verb and resource.
        kube::Error::Api(ae) if ae.code == 403 => anyhow::anyhow!(
            "not allowed by the cluster's RBAC: {} (ask a fleet admin for a role that allows it, e.g. iot-fleet-deployer)",
            ae.message
        ),
        kube::Error::Api(ae) if ae.code == 401 => anyhow::anyhow!(
            "the API server at {server} did not accept your credentials (401 Unauthorized): \
             log in again (iotctl login) or check KUBECONFIG"
        ),
        kube::Error::Api(ae) => anyhow::anyhow!("API server error {}: {}", ae.code, ae.message),
        other => {
            // The innermost cause ("Connection refused", a TLS error) is what helps.
            let mut root: &dyn std::error::Error = &other;
            while let Some(next) = root.source() {
                root = next;
            }
            anyhow::anyhow!("cannot talk to the Kubernetes API server at {server}: {root}")
        }
    }
}
