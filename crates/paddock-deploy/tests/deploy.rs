// Test code: a failed unwrap is a failed test with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The generated chart and zarf.yaml against the real tools and the real control plane:
//! - the committed `deploy/chart` and `deploy/zarf.yaml` are what the code generates, and zarf.yaml
//!   validates against Zarf v0.84.0's schema;
//! - `deploy/build-image.sh` builds the operator image from the `paddock` binary, the image runs, and
//!   the real zarf CLI packages the chart and that image offline (`zarf package create`), shows them
//!   (`zarf package inspect definition|images`) and renders the chart (`inspect manifests`); the API
//!   server accepts every rendered object (server-side apply, `dryRun=All`), and a pod made from the
//!   Deployment's template is admitted in a namespace enforcing the restricted Pod Security profile;
//! - the real `paddock operator`, started with the rendered Deployment's arguments and impersonating
//!   a ServiceAccount that has exactly the rendered RBAC, takes its Lease, issues its TLS Secret,
//!   stays unready until the chart's webhook configurations (applied after it starts, as Helm may)
//!   exist, then injects its CA into them and turns ready, serves the mutating webhook through the
//!   API server and reconciles an app (DataVolume, VM, SSH-key Secret created, pruned, status
//!   written, a scheduled snapshot and its Event); a `caBundle` reset by a replace (`helm upgrade
//!   --force`) is re-injected; deleting the chart's objects (uninstall) leaves no webhook
//!   configuration behind while the operator still runs; it releases its Lease — with no request
//!   forbidden; every row of the RBAC table is allowed (SubjectAccessReview) and neighbouring
//!   requests are denied.
//! - the console (`console.enabled`, default on) renders six objects (two replicas sharing the
//!   generated session key Secret, or the one `console.sessionKeySecret` names), its pod is
//!   admitted under the restricted profile, the operator's gateway URL defaults to its Service, and its ServiceAccount
//!   can do every row of the console RBAC table (SubjectAccessReview) and no neighbouring request;
//!   with the console off, `consoleGatewayUrl` is required.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use paddock_deploy::rbac::{self, ResourceName, Scope};
use paddock_tests::cluster::Cluster;
use paddock_tests::paths::{repository_root, schemas_dir};
use paddock_tests::world::{
    baffles_applications, data_volumes, paddock_binary, virtual_machine_apps, virtual_machines,
};
use paddock_tests::zarf::{Zarf, require_zarf};
use serde_json::{Value, json};

// Long enough for a once-a-minute snapshot schedule to fire.
const TIMEOUT: Duration = Duration::from_secs(120);

fn deploy_dir() -> PathBuf {
    repository_root().join("deploy")
}

fn text(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Runs `zarf tools helm template` (Helm inside the real zarf binary) on the committed chart.
fn helm_template(zarf: &Zarf, release: &str, namespace: &str, sets: &[&str]) -> Vec<Value> {
    let output = helm_template_output(zarf, release, namespace, sets);
    assert!(
        output.status.success(),
        "helm template failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    documents(&String::from_utf8_lossy(&output.stdout))
}

fn helm_template_output(zarf: &Zarf, release: &str, namespace: &str, sets: &[&str]) -> std::process::Output {
    let home = tempfile::tempdir().unwrap();
    let mut command = Command::new(zarf.binary());
    command
        .args(["tools", "helm", "template", release])
        .arg(deploy_dir().join("chart"))
        .args(["--namespace", namespace]);
    for set in sets {
        command.args(["--set", set]);
    }
    command
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("HOME", home.path())
        .output()
        .unwrap()
}

#[test]
fn helm_lints_the_chart_and_refuses_values_the_operator_would_refuse() {
    let Some(zarf) = require_zarf("helm_refuses_values_the_operator_would_refuse").unwrap() else {
        return;
    };
    let home = tempfile::tempdir().unwrap();
    let lint = Command::new(zarf.binary())
        .args(["tools", "helm", "lint", "--strict"])
        .arg(deploy_dir().join("chart"))
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("HOME", home.path())
        .output()
        .unwrap();
    assert!(
        lint.status.success(),
        "helm lint: {}",
        String::from_utf8_lossy(&lint.stdout)
    );
    // The defaults render 19 objects (the CRD in crds/ is installed, not templated): 13 of the
    // operator and 6 of the console.
    let defaults = helm_template(&zarf, "paddock", "paddock-system", &[]);
    assert_eq!(defaults.len(), 19);
    // Two console replicas, both given the generated session key Secret.
    let console = defaults
        .iter()
        .find(|object| object["kind"] == "Deployment" && object["metadata"]["name"] == "paddock-console")
        .unwrap();
    assert_eq!(console["spec"]["replicas"], 2);
    assert_eq!(
        console["spec"]["template"]["spec"]["volumes"][0]["secret"]["secretName"],
        "paddock-console-session"
    );
    let key = defaults
        .iter()
        .find(|object| object["kind"] == "Secret" && object["metadata"]["name"] == "paddock-console-session")
        .unwrap();
    assert!(
        key["data"]["key"].as_str().unwrap().len() >= 64,
        "a generated key: {key:#?}"
    );
    // With a Secret of one's own, the chart makes none and mounts that one.
    let own_key = helm_template(
        &zarf,
        "paddock",
        "paddock-system",
        &["console.sessionKeySecret=console-key"],
    );
    assert_eq!(own_key.len(), 18);
    assert!(own_key.iter().all(|object| object["kind"] != "Secret"));
    let console = own_key
        .iter()
        .find(|object| object["kind"] == "Deployment" && object["metadata"]["name"] == "paddock-console")
        .unwrap();
    assert_eq!(
        console["spec"]["template"]["spec"]["volumes"][0]["secret"]["secretName"],
        "console-key"
    );
    // The operator points Baffles at the console's Service.
    let operator = defaults
        .iter()
        .find(|object| object["kind"] == "Deployment" && object["metadata"]["name"] == "paddock-operator")
        .unwrap();
    assert!(
        operator["spec"]["template"]["spec"]["containers"][0]["args"]
            .as_array()
            .unwrap()
            .contains(&json!(
                "--console-gateway-url=ws://paddock-console.paddock-system.svc"
            )),
        "{operator:#?}"
    );
    let without_console = helm_template(
        &zarf,
        "paddock",
        "paddock-system",
        &[
            "console.enabled=false",
            "consoleGatewayUrl=wss://gateway.example.invalid",
        ],
    );
    assert_eq!(without_console.len(), 13);
    assert!(
        without_console
            .iter()
            .all(|object| object["metadata"]["labels"]["app.kubernetes.io/component"] != "console")
    );
    // Without the console, the operator needs to be told where the gateway is.
    let output = helm_template_output(&zarf, "paddock", "paddock-system", &["console.enabled=false"]);
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("consoleGatewayUrl must be set"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for bad in [
        "webhook.timeoutSeconds=31",
        "webhook.failurePolicy=Sometimes",
        "replicas=0",
        "watchNamespace=Not_A_Namespace",
        "replica=3",
        "console.enabled=maybe",
        "console.replicas=0",
        "console.sessionKeySecret=Not_A_Name",
    ] {
        let output = helm_template_output(&zarf, "paddock", "paddock-system", &[bad]);
        assert!(!output.status.success(), "helm accepted {bad}");
        assert!(
            String::from_utf8_lossy(&output.stderr).contains("schema"),
            "{bad}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// The objects of a multi-document YAML stream (comments and empty documents skipped).
fn documents(text: &str) -> Vec<Value> {
    text.split("\n---")
        .filter_map(|document| serde_yaml::from_str::<Value>(document).ok())
        .filter(|value| value.get("kind").is_some())
        .collect()
}

fn api_resource(object: &Value) -> (ApiResource, bool) {
    let api_version = object["apiVersion"].as_str().unwrap();
    let kind = object["kind"].as_str().unwrap();
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    let plural = match kind {
        "PodDisruptionBudget" => "poddisruptionbudgets".to_owned(),
        "CustomResourceDefinition" => "customresourcedefinitions".to_owned(),
        other => format!("{}s", other.to_ascii_lowercase()),
    };
    let namespaced = !matches!(
        kind,
        "ClusterRole"
            | "ClusterRoleBinding"
            | "CustomResourceDefinition"
            | "Namespace"
            | "MutatingWebhookConfiguration"
            | "ValidatingWebhookConfiguration"
    );
    (
        ApiResource {
            group: group.to_owned(),
            version: version.to_owned(),
            api_version: api_version.to_owned(),
            kind: kind.to_owned(),
            plural,
        },
        namespaced,
    )
}

/// Server-side applies `object` as the field manager `manager` (e.g. `helm`, as Helm 4 does).
async fn apply_as(client: &kube::Client, object: &Value, manager: &str) -> Result<(), kube::Error> {
    let (resource, _) = api_resource(object);
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
    let mut parameters = PatchParams::apply(manager).force();
    parameters.field_validation = Some(kube::api::ValidationDirective::Strict);
    api.patch(
        object["metadata"]["name"].as_str().unwrap(),
        &parameters,
        &Patch::Apply(object),
    )
    .await
    .map(|_| ())
}

async fn apply(client: &kube::Client, object: &Value, dry_run: bool) -> Result<(), kube::Error> {
    let (resource, namespaced) = api_resource(object);
    let api: Api<DynamicObject> = if namespaced {
        Api::namespaced_with(
            client.clone(),
            object["metadata"]["namespace"].as_str().unwrap(),
            &resource,
        )
    } else {
        Api::all_with(client.clone(), &resource)
    };
    let mut parameters = PatchParams::apply("paddock-deploy-test").force();
    if dry_run {
        parameters = parameters.dry_run();
    }
    parameters.field_validation = Some(kube::api::ValidationDirective::Strict);
    api.patch(
        object["metadata"]["name"].as_str().unwrap(),
        &parameters,
        &Patch::Apply(object),
    )
    .await
    .map(|_| ())
}

fn kind_count(objects: &[Value], kind: &str) -> usize {
    objects.iter().filter(|object| object["kind"] == kind).count()
}

#[test]
fn committed_chart_and_zarf_yaml_are_what_the_code_generates() {
    for file in paddock_deploy::chart_files().unwrap() {
        let path = deploy_dir().join("chart").join(&file.path);
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == file.contents,
            "{} drifted from the code; run `cargo run -p paddock -- chart --output deploy/chart` and commit it",
            path.display()
        );
    }
    let committed_files = walk(&deploy_dir().join("chart"));
    assert_eq!(
        committed_files.len(),
        paddock_deploy::chart_files().unwrap().len(),
        "deploy/chart holds files the generator does not make: {committed_files:?}"
    );
    let zarf_yaml = std::fs::read_to_string(deploy_dir().join("zarf.yaml")).unwrap();
    assert_eq!(zarf_yaml, paddock_deploy::zarf_yaml().unwrap());

    let schema: Value = serde_json::from_str(
        &std::fs::read_to_string(schemas_dir().join("zarf-v0.84.0-schema.json")).unwrap(),
    )
    .unwrap();
    let validator = jsonschema::validator_for(&schema).unwrap();
    let package: Value = serde_yaml::from_str(&zarf_yaml).unwrap();
    let errors: Vec<String> = validator
        .iter_errors(&package)
        .map(|error| error.to_string())
        .collect();
    assert!(
        errors.is_empty(),
        "zarf.yaml violates the Zarf v0.84.0 schema: {errors:#?}"
    );
    // The check is live: a misspelt chart field is refused.
    let mut broken = package.clone();
    broken["components"][0]["charts"][0]["localpath"] = json!("chart");
    assert!(validator.iter_errors(&broken).next().is_some());
}

fn walk(directory: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(directory).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

#[tokio::test(flavor = "multi_thread")]
async fn zarf_packages_the_chart_and_image_and_the_api_server_accepts_every_object() {
    let Some(zarf) = require_zarf("zarf_packages_the_chart_and_image").unwrap() else {
        return;
    };
    let Some(cluster) = Cluster::shared().unwrap() else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let package_directory = work.path().join("deploy");
    std::fs::create_dir_all(package_directory.join("build")).unwrap();
    copy_tree(&deploy_dir().join("chart"), &package_directory.join("chart"));
    std::fs::copy(
        deploy_dir().join("zarf.yaml"),
        package_directory.join("zarf.yaml"),
    )
    .unwrap();
    // build-image.sh reads the reference from the zarf.yaml beside it.
    std::fs::copy(
        deploy_dir().join("build-image.sh"),
        package_directory.join("build-image.sh"),
    )
    .unwrap();
    let archive = package_directory.join(paddock_deploy::IMAGE_ARCHIVE);
    let built = Command::new("bash")
        .arg(package_directory.join("build-image.sh"))
        .arg(paddock_binary().unwrap())
        .arg(&archive)
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "build-image.sh failed: {}",
        String::from_utf8_lossy(&built.stderr)
    );
    assert_image_runs(&archive, work.path());

    let out = work.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let created = zarf
        .run(
            work.path(),
            &[
                "package",
                "create",
                text(&package_directory),
                "--confirm",
                "--skip-sbom",
                "--output",
                text(&out),
            ],
        )
        .unwrap();
    assert!(created.status.success(), "zarf package create failed");
    let package = std::fs::read_dir(&out).unwrap().next().unwrap().unwrap().path();
    assert!(
        text(&package).ends_with(&format!(
            "zarf-package-paddock-operator-amd64-{}.tar.zst",
            paddock_deploy::VERSION
        )),
        "{package:?}"
    );
    let definition = zarf
        .run(work.path(), &["package", "inspect", "definition", text(&package)])
        .unwrap();
    assert!(definition.status.success());
    let definition: Value = serde_yaml::from_slice(&definition.stdout).unwrap();
    assert_eq!(definition["components"][0]["charts"][0]["name"], "paddock");
    let images = zarf
        .run(work.path(), &["package", "inspect", "images", text(&package)])
        .unwrap();
    assert!(images.status.success());
    assert!(String::from_utf8_lossy(&images.stdout).contains(&paddock_deploy::operator_image()));

    // Zarf renders the chart as it would install it.
    let manifests = zarf
        .run(work.path(), &["package", "inspect", "manifests", text(&package)])
        .unwrap();
    assert!(manifests.status.success());
    let objects = documents(&String::from_utf8_lossy(&manifests.stdout));
    for (kind, count) in [
        ("CustomResourceDefinition", 1),
        ("ServiceAccount", 2),
        ("ClusterRole", 3),
        ("ClusterRoleBinding", 3),
        ("Role", 1),
        ("RoleBinding", 1),
        ("Deployment", 2),
        ("Service", 3),
        ("PodDisruptionBudget", 1),
        ("MutatingWebhookConfiguration", 1),
        ("ValidatingWebhookConfiguration", 1),
        ("Secret", 1),
    ] {
        assert_eq!(kind_count(&objects, kind), count, "{kind} in {objects:#?}");
    }
    let deployment = objects
        .iter()
        .find(|object| object["kind"] == "Deployment" && object["metadata"]["name"] == "paddock-operator")
        .unwrap();
    assert_eq!(deployment["spec"]["replicas"], 2);
    assert_eq!(
        deployment["spec"]["template"]["spec"]["containers"][0]["image"],
        paddock_deploy::operator_image()
    );
    let console = objects
        .iter()
        .find(|object| object["kind"] == "Deployment" && object["metadata"]["name"] == "paddock-console")
        .unwrap();
    // Two replicas sharing the session key Secret.
    assert_eq!(console["spec"]["replicas"], 2);
    assert_eq!(
        console["spec"]["template"]["spec"]["containers"][0]["image"],
        paddock_deploy::operator_image()
    );

    // The API server accepts every object (in a test namespace instead of paddock-system, with a
    // unique name for the cluster-scoped ones), with strict field validation.
    let client = cluster.admin_client().await.unwrap();
    let namespace = cluster.namespace("paddock-chart").await.unwrap();
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .patch(
            namespace.name(),
            &PatchParams::apply("paddock-deploy-test"),
            &Patch::Apply(json!({
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {"name": namespace.name(), "labels": {
                    "pod-security.kubernetes.io/enforce": "restricted",
                    "pod-security.kubernetes.io/enforce-version": "latest",
                }},
            })),
        )
        .await
        .unwrap();
    for object in &objects {
        let mut object = object.clone();
        if object["metadata"].get("namespace").is_some() {
            object["metadata"]["namespace"] = json!(namespace.name());
        } else if object["kind"] != "CustomResourceDefinition" {
            object["metadata"]["name"] = json!(format!(
                "{}-{}",
                namespace.name(),
                object["metadata"]["name"].as_str().unwrap()
            ));
        }
        if let Err(error) = apply(&client, &object, true).await {
            panic!(
                "the API server refused {} {}: {error}",
                object["kind"], object["metadata"]["name"]
            );
        }
    }
    // Pod Security admission judges pods, not Deployments: a pod from each template must be admitted
    // under `restricted`.
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), namespace.name());
    let mut pod = None;
    for (which, deployment) in [("operator", deployment), ("console", console)] {
        let mut pod_spec = deployment["spec"]["template"]["spec"].clone();
        pod_spec["serviceAccountName"] = json!("default");
        let candidate: k8s_openapi::api::core::v1::Pod = serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": which, "namespace": namespace.name()},
            "spec": pod_spec,
        }))
        .unwrap();
        pods.create(
            &PostParams {
                dry_run: true,
                ..PostParams::default()
            },
            &candidate,
        )
        .await
        .unwrap_or_else(|error| panic!("the restricted profile refused the {which} pod: {error}"));
        pod.get_or_insert(candidate);
    }
    let pod = pod.unwrap();
    // And the profile is enforced here: a privileged variant is refused.
    let mut privileged = pod.clone();
    if let Some(spec) = privileged.spec.as_mut() {
        spec.containers[0].security_context = Some(k8s_openapi::api::core::v1::SecurityContext {
            privileged: Some(true),
            ..Default::default()
        });
    }
    assert!(
        pods.create(
            &PostParams {
                dry_run: true,
                ..PostParams::default()
            },
            &privileged
        )
        .await
        .is_err()
    );
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Unpacks the image's only layer and runs `paddock operator --help` in it, chrooted, as the
/// image's user: the binary and every library it needs are in the image.
fn assert_image_runs(archive: &Path, work: &Path) {
    let unpacked = work.join("image");
    std::fs::create_dir_all(&unpacked).unwrap();
    let status = Command::new("tar")
        .arg("xf")
        .arg(archive)
        .arg("-C")
        .arg(&unpacked)
        .status()
        .unwrap();
    assert!(status.success());
    let index: Value = serde_json::from_slice(&std::fs::read(unpacked.join("index.json")).unwrap()).unwrap();
    assert_eq!(
        index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"],
        paddock_deploy::operator_image()
    );
    let blob = |digest: &Value| {
        unpacked
            .join("blobs/sha256")
            .join(digest.as_str().unwrap().trim_start_matches("sha256:"))
    };
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(blob(&index["manifests"][0]["digest"])).unwrap()).unwrap();
    let config: Value =
        serde_json::from_slice(&std::fs::read(blob(&manifest["config"]["digest"])).unwrap()).unwrap();
    assert_eq!(config["config"]["User"], "65532:65532");
    assert_eq!(config["config"]["Entrypoint"], json!(["/usr/local/bin/paddock"]));
    let root = work.join("rootfs");
    std::fs::create_dir_all(&root).unwrap();
    let status = Command::new("tar")
        .arg("xf")
        .arg(blob(&manifest["layers"][0]["digest"]))
        .arg("-C")
        .arg(&root)
        .status()
        .unwrap();
    assert!(status.success());
    let output = Command::new("chroot")
        .args(["--userspec=65532:65532"])
        .arg(&root)
        .args(["/usr/local/bin/paddock", "operator", "--help"])
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .output()
        .unwrap();
    assert!(
        output.status.success() && String::from_utf8_lossy(&output.stdout).contains("--webhook-service"),
        "the image's paddock does not run: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// One SubjectAccessReview for `user` in `groups`.
async fn allowed(
    client: &kube::Client,
    user: &str,
    groups: &[String],
    attributes: ResourceAttributes,
) -> bool {
    let reviews: Api<SubjectAccessReview> = Api::all(client.clone());
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(user.to_owned()),
            groups: Some(groups.to_vec()),
            resource_attributes: Some(attributes),
            ..SubjectAccessReviewSpec::default()
        },
        ..SubjectAccessReview::default()
    };
    let answer = reviews.create(&PostParams::default(), &review).await.unwrap();
    answer.status.is_some_and(|status| status.allowed)
}

fn attributes(
    group: &str,
    resource: &str,
    verb: &str,
    namespace: Option<&str>,
    name: Option<&str>,
) -> ResourceAttributes {
    let (resource, subresource) = match resource.split_once('/') {
        Some((resource, subresource)) => (resource, Some(subresource.to_owned())),
        None => (resource, None),
    };
    ResourceAttributes {
        group: Some(group.to_owned()),
        resource: Some(resource.to_owned()),
        subresource,
        verb: Some(verb.to_owned()),
        namespace: namespace.map(str::to_owned),
        name: name.map(str::to_owned),
        ..ResourceAttributes::default()
    }
}

async fn wait_for<T>(what: &str, mut probe: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_console_service_account_can_do_exactly_the_console_table() {
    let Some(zarf) = require_zarf("the_console_service_account_can_do_exactly_the_console_table").unwrap()
    else {
        return;
    };
    let Some(cluster) = Cluster::shared().unwrap() else {
        return;
    };
    let admin = cluster.admin_client().await.unwrap();
    let own = cluster.namespace("pdc").await.unwrap();
    let elsewhere = cluster.namespace("pdcx").await.unwrap();
    let release = own.name().to_owned();
    let objects = helm_template(&zarf, &release, own.name(), &[]);
    let _cleanup = Cleanup {
        kubectl: cluster.kubectl(),
        objects: vec![
            format!("clusterrole/{release}-console"),
            format!("clusterrolebinding/{release}-console"),
        ],
    };
    let console_objects: Vec<&Value> = objects
        .iter()
        .filter(|object| object["metadata"]["labels"]["app.kubernetes.io/component"] == "console")
        .collect();
    for (kind, count) in [
        ("ServiceAccount", 1),
        ("ClusterRole", 1),
        ("ClusterRoleBinding", 1),
        ("Secret", 1),
        ("Deployment", 1),
        ("Service", 1),
    ] {
        assert_eq!(
            console_objects
                .iter()
                .filter(|object| object["kind"] == kind)
                .count(),
            count,
            "{kind}"
        );
    }
    assert_eq!(console_objects.len(), 6);
    for object in console_objects.iter().filter(|object| {
        ["ServiceAccount", "ClusterRole", "ClusterRoleBinding"].contains(&object["kind"].as_str().unwrap())
    }) {
        apply(&admin, object, false).await.unwrap();
    }
    let user = format!("system:serviceaccount:{}:{release}-console", own.name());
    let groups = vec![
        "system:serviceaccounts".to_owned(),
        format!("system:serviceaccounts:{}", own.name()),
        "system:authenticated".to_owned(),
    ];
    // Every row of the console table, cluster-wide and in any namespace.
    for permission in rbac::console_permissions() {
        let places: Vec<(Option<&str>, Option<&str>)> = match permission.resource {
            "tokenreviews" | "subjectaccessreviews" => vec![(None, None)],
            "users" => vec![(None, Some("alice")), (None, Some("system:admin"))],
            "groups" => vec![(None, Some("developers"))],
            "serviceaccounts" => vec![(Some(elsewhere.name()), Some("default"))],
            // Cluster-scoped, and only CDI's one CDIConfig.
            "cdiconfigs" => vec![(None, Some("config"))],
            _ => vec![(None, None), (Some(elsewhere.name()), None)],
        };
        for (namespace, name) in places {
            assert!(
                allowed(
                    &admin,
                    &user,
                    &groups,
                    attributes(
                        permission.api_group,
                        permission.resource,
                        permission.verb,
                        namespace,
                        name
                    )
                )
                .await,
                "{permission:?} is not granted in {namespace:?} for {name:?}"
            );
        }
    }
    // Neighbouring requests are not: the console writes nothing with its own credentials, and reads
    // nothing but its four caches and CDI's CDIConfig.
    for (group, resource, verb, namespace, name) in [
        (
            "kubevirt.io",
            "virtualmachines",
            "get",
            Some(elsewhere.name()),
            Some("any"),
        ),
        (
            "kubevirt.io",
            "virtualmachines",
            "patch",
            Some(elsewhere.name()),
            Some("any"),
        ),
        (
            "kubevirt.io",
            "virtualmachines",
            "delete",
            Some(elsewhere.name()),
            Some("any"),
        ),
        (
            "kubevirt.io",
            "virtualmachines/start",
            "update",
            Some(elsewhere.name()),
            Some("any"),
        ),
        (
            "subresources.kubevirt.io",
            "virtualmachineinstances/vnc",
            "get",
            Some(elsewhere.name()),
            Some("any"),
        ),
        (
            "paddock.dev",
            "virtualmachineapps",
            "patch",
            Some(elsewhere.name()),
            Some("any"),
        ),
        (
            "snapshot.kubevirt.io",
            "virtualmachinesnapshots",
            "create",
            Some(elsewhere.name()),
            None,
        ),
        (
            "snapshot.kubevirt.io",
            "virtualmachinerestores",
            "list",
            None,
            None,
        ),
        ("cdi.kubevirt.io", "datavolumes", "list", None, None),
        ("cdi.kubevirt.io", "cdiconfigs", "list", None, None),
        ("cdi.kubevirt.io", "cdiconfigs", "update", None, Some("config")),
        ("", "secrets", "list", Some(elsewhere.name()), None),
        ("", "pods", "list", None, None),
        (
            "authentication.k8s.io",
            "userextras",
            "impersonate",
            None,
            Some("scopes"),
        ),
        ("authentication.k8s.io", "uids", "impersonate", None, Some("any")),
        ("", "users", "get", None, Some("alice")),
        (
            "rbac.authorization.k8s.io",
            "clusterroles",
            "bind",
            None,
            Some("cluster-admin"),
        ),
        (
            "authorization.k8s.io",
            "localsubjectaccessreviews",
            "create",
            Some(elsewhere.name()),
            None,
        ),
    ] {
        assert!(
            !allowed(
                &admin,
                &user,
                &groups,
                attributes(group, resource, verb, namespace, name)
            )
            .await,
            "{verb} {group}/{resource} {name:?} in {namespace:?} is granted but the console never needs it"
        );
    }
    // And the operator's identity does not get the console's rights.
    let operator = format!("system:serviceaccount:{}:{release}-operator", own.name());
    assert!(
        !allowed(
            &admin,
            &operator,
            &groups,
            attributes("", "users", "impersonate", None, Some("alice"))
        )
        .await
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_operator_works_with_exactly_the_chart_rbac() {
    let Some(zarf) = require_zarf("the_operator_works_with_exactly_the_chart_rbac").unwrap() else {
        return;
    };
    let Some(cluster) = Cluster::shared().unwrap() else {
        return;
    };
    let admin = cluster.admin_client().await.unwrap();
    let own = cluster.namespace("pdo").await.unwrap();
    let watched = cluster.namespace("pdw").await.unwrap();
    let elsewhere = cluster.namespace("pdx").await.unwrap();
    let release = own.name().to_owned();
    let configuration = format!("{release}-webhooks");
    let objects = helm_template(
        &zarf,
        &release,
        own.name(),
        &[
            &format!("watchNamespace={}", watched.name()),
            &format!("webhook.configurationName={configuration}"),
            "webhook.failurePolicy=Ignore",
            // The console has its own test; here only the operator's objects.
            "console.enabled=false",
            "consoleGatewayUrl=wss://gateway.example.invalid",
        ],
    );
    let _cleanup = Cleanup {
        kubectl: cluster.kubectl(),
        objects: vec![
            format!("clusterrole/{release}-operator"),
            format!("clusterrole/{release}-operator-cluster"),
            format!("clusterrolebinding/{release}-operator-cluster"),
            format!("mutatingwebhookconfiguration/{configuration}"),
            format!("validatingwebhookconfiguration/{configuration}"),
        ],
    };
    for object in objects.iter().filter(|object| {
        [
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "Role",
            "RoleBinding",
        ]
        .contains(&object["kind"].as_str().unwrap())
    }) {
        apply(&admin, object, false).await.unwrap();
    }
    // Watch-namespace mode binds the namespaced rules in the watched namespace only.
    assert_eq!(kind_count(&objects, "ClusterRoleBinding"), 1);
    assert_eq!(kind_count(&objects, "RoleBinding"), 2);

    let user = format!("system:serviceaccount:{}:{release}-operator", own.name());
    let groups = vec![
        "system:serviceaccounts".to_owned(),
        format!("system:serviceaccounts:{}", own.name()),
        "system:authenticated".to_owned(),
    ];
    // Every row of the table is allowed where the chart means it to be.
    let permissions = rbac::permissions();
    for permission in &permissions {
        let (namespace, name) = match (&permission.scope, &permission.name) {
            (Scope::Watched, _) => (Some(watched.name()), None),
            (Scope::Release, ResourceName::Fixed(name)) => (Some(own.name()), Some(name.as_str())),
            (Scope::Release, _) => (Some(own.name()), None),
            (Scope::Cluster, ResourceName::Fixed(name)) if permission.resource == "secrets" => (
                Some(paddock_operator::facts::ZARF_STATE_SECRET.0),
                Some(name.as_str()),
            ),
            (Scope::Cluster, ResourceName::Fixed(name)) => (None, Some(name.as_str())),
            (Scope::Cluster, _) => (None, Some(configuration.as_str())),
            (Scope::Console, _) => panic!("{permission:?}: the operator's table has no console rows"),
        };
        assert!(
            allowed(
                &admin,
                &user,
                &groups,
                attributes(
                    permission.api_group,
                    permission.resource,
                    permission.verb,
                    namespace,
                    name
                )
            )
            .await,
            "{permission:?} is not granted in {namespace:?}"
        );
    }
    // Neighbouring requests are not.
    for (group, resource, verb, namespace, name) in [
        (
            "paddock.dev",
            "virtualmachineapps",
            "list",
            Some(elsewhere.name()),
            None,
        ),
        (
            "paddock.dev",
            "virtualmachineapps",
            "update",
            Some(watched.name()),
            Some("any"),
        ),
        (
            "paddock.dev",
            "virtualmachineapps",
            "delete",
            Some(watched.name()),
            Some("any"),
        ),
        (
            "kubevirt.io",
            "virtualmachines",
            "delete",
            Some(watched.name()),
            Some("any"),
        ),
        (
            "kubevirt.io",
            "virtualmachines/start",
            "update",
            Some(watched.name()),
            Some("any"),
        ),
        // Backups read Secrets (export tokens, registry credentials) in the watched namespace only.
        ("", "secrets", "get", Some(elsewhere.name()), Some("any")),
        ("", "secrets", "get", Some(own.name()), Some("another-secret")),
        ("", "secrets", "list", Some(own.name()), None),
        ("", "secrets", "get", Some("zarf"), Some("private-registry")),
        (
            "coordination.k8s.io",
            "leases",
            "update",
            Some(own.name()),
            Some("another-lease"),
        ),
        (
            "admissionregistration.k8s.io",
            "mutatingwebhookconfigurations",
            "patch",
            None,
            Some("zarf"),
        ),
        (
            "admissionregistration.k8s.io",
            "validatingwebhookconfigurations",
            "delete",
            None,
            Some(configuration.as_str()),
        ),
        // The chart owns the configurations: the operator never creates one.
        (
            "admissionregistration.k8s.io",
            "mutatingwebhookconfigurations",
            "create",
            None,
            None,
        ),
        (
            "admissionregistration.k8s.io",
            "validatingwebhookconfigurations",
            "list",
            None,
            None,
        ),
        (
            "apiextensions.k8s.io",
            "customresourcedefinitions",
            "get",
            None,
            Some("virtualmachineapps.paddock.dev"),
        ),
        ("", "pods", "list", Some(watched.name()), None),
    ] {
        assert!(
            !allowed(
                &admin,
                &user,
                &groups,
                attributes(group, resource, verb, namespace, name)
            )
            .await,
            "{verb} {group}/{resource} {name:?} in {namespace:?} is granted but the operator never needs it"
        );
    }

    // The real operator, with the Deployment's arguments, as that ServiceAccount.
    let scratch = tempfile::tempdir().unwrap();
    let kubeconfig = own_kubeconfig(cluster, scratch.path(), &user, &groups);
    let deployment = objects
        .iter()
        .find(|object| object["kind"] == "Deployment")
        .unwrap();
    let port = free_port();
    let mut arguments: Vec<String> = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|argument| argument.as_str().unwrap().to_owned())
        .collect();
    for argument in &mut arguments {
        // No pod network here: the API server reaches the webhooks on loopback.
        if argument.starts_with("--listen=") {
            *argument = "--listen=127.0.0.1:0".to_owned();
        } else if argument.starts_with("--webhook-listen=") {
            *argument = format!("--webhook-listen=127.0.0.1:{port}");
        } else if argument.starts_with("--webhook-service=") {
            *argument = format!("--webhook-url=https://127.0.0.1:{port}");
        }
    }
    assert!(
        arguments.contains(&format!("--namespace={}", watched.name())),
        "{arguments:?}"
    );
    assert!(
        arguments.contains(&"--webhook-configurations=inject-ca".to_owned()),
        "{arguments:?}"
    );
    let log = scratch.path().join("operator.log");
    let mut operator = Running(
        Command::new(paddock_binary().unwrap())
            .args(&arguments)
            .env("KUBECONFIG", &kubeconfig)
            .env("POD_NAME", format!("{release}-operator-0"))
            .env("POD_NAMESPACE", own.name())
            .env("RUST_LOG", "info,kube=warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );

    let leases: Api<Lease> = Api::namespaced(admin.clone(), own.name());
    let lease_name = rbac::lease_name();
    let holder = format!("{release}-operator-0");
    wait_for("the leader Lease", async || {
        let lease = leases.get_opt(&lease_name).await.ok()??;
        (lease.spec?.holder_identity? == holder).then_some(())
    })
    .await;
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), own.name());
    wait_for("the webhook TLS Secret", async || {
        secrets
            .get_opt(&rbac::webhook_tls_secret_name())
            .await
            .ok()?
            .map(|_| ())
    })
    .await;
    // No configuration yet (Helm may create them after the pods start): up, but not ready.
    wait_for("/readyz to answer", async || readiness(port)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(readiness(port), Some(503), "ready without webhook configurations");

    // The chart's configurations, as Helm applies them, except that the API server reaches the
    // webhooks on loopback (a URL instead of the Service, like --webhook-url above).
    let chart_configurations: Vec<Value> = objects
        .iter()
        .filter(|object| object["kind"].as_str().unwrap().ends_with("WebhookConfiguration"))
        .map(|object| loopback_configuration(object, port))
        .collect();
    assert_eq!(chart_configurations.len(), 2);
    for object in &chart_configurations {
        assert_eq!(object["metadata"]["name"], configuration.as_str());
        assert!(object.to_string().find("caBundle").is_none(), "{object}");
        apply_as(&admin, object, "helm").await.unwrap();
    }
    let mutating: Api<MutatingWebhookConfiguration> = Api::all(admin.clone());
    let validating: Api<ValidatingWebhookConfiguration> = Api::all(admin.clone());
    let tls_secret = secrets.get(&rbac::webhook_tls_secret_name()).await.unwrap();
    let ca = String::from_utf8(
        tls_secret.data.unwrap()[paddock_admission::tls::CA_CERTIFICATE_KEY]
            .0
            .clone(),
    )
    .unwrap();
    wait_for(
        "the CA injected into every webhook of both configurations",
        async || {
            injected(&mutating, &validating, &configuration, &ca)
                .await
                .then_some(())
        },
    )
    .await;
    wait_for("/readyz 200 once the CA is injected", async || {
        (readiness(port)? == 200).then_some(())
    })
    .await;
    // Only caBundle changed hands: the chart's manager still owns the rest (service, rules…).
    let live = mutating.get(&configuration).await.unwrap();
    let managers: Vec<String> = live
        .metadata
        .managed_fields
        .unwrap_or_default()
        .iter()
        .filter_map(|entry| entry.manager.clone())
        .collect();
    assert!(managers.contains(&"helm".to_owned()), "{managers:?}");
    assert!(
        managers
            .iter()
            .any(|manager| manager.starts_with("paddock-admission")),
        "{managers:?}"
    );
    for webhook in live.webhooks.unwrap() {
        assert!(webhook.client_config.url.is_some(), "{webhook:?}");
        assert_eq!(webhook.failure_policy.as_deref(), Some("Ignore"));
    }

    // An app in the watched namespace: defaulted by the webhook, reconciled by the controllers.
    let apps: Api<DynamicObject> =
        Api::namespaced_with(admin.clone(), watched.name(), &virtual_machine_apps());
    let app: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "paddock.dev/v1alpha1",
        "kind": "VirtualMachineApp",
        "metadata": {"name": "rbac"},
        "spec": {
            "image": {"containerDisk": "quay.io/containerdisks/debian:12"},
            "disk": {"size": "1Gi"},
            "cloudInit": {"sshKeys": ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl test"]},
            // Every minute: within about a minute a scheduled snapshot (create) and its Event.
            "snapshots": {"schedule": "* * * * *", "keep": 1},
        },
    }))
    .unwrap();
    let created = apps.create(&PostParams::default(), &app).await.unwrap();
    assert!(
        created.metadata.annotations.as_ref().is_some_and(
            |annotations| annotations.contains_key(paddock_admission::mutate::DEFAULTED_ANNOTATION)
        ),
        "the mutating webhook did not default the app: {:?}",
        created.metadata
    );

    // `helm upgrade --force` (a replace) writes the chart's objects without a caBundle: the
    // operator notices and injects it again, and the API server calls the webhook again.
    for object in &chart_configurations {
        let (resource, _) = api_resource(object);
        let api: Api<DynamicObject> = Api::all_with(admin.clone(), &resource);
        let current = api.get(&configuration).await.unwrap();
        let mut replacement: DynamicObject = serde_json::from_value(object.clone()).unwrap();
        replacement.metadata.resource_version = current.metadata.resource_version;
        let stored = api
            .replace(&configuration, &PostParams::default(), &replacement)
            .await
            .unwrap();
        // What the replace stored (the operator may re-inject before a later read could see it).
        assert!(
            stored.data["webhooks"]
                .as_array()
                .unwrap()
                .iter()
                .all(|webhook| webhook["clientConfig"].get("caBundle").is_none()),
            "the replace did not reset the caBundle: {:?}",
            stored.data
        );
    }
    wait_for("the CA injected again after the reset", async || {
        injected(&mutating, &validating, &configuration, &ca)
            .await
            .then_some(())
    })
    .await;
    let mut probe_app = app.clone();
    probe_app.metadata.name = Some("rbac-probe".to_owned());
    wait_for("the webhook called again after the reset", async || {
        let probe = apps
            .create(
                &PostParams {
                    dry_run: true,
                    ..PostParams::default()
                },
                &probe_app,
            )
            .await
            .ok()?;
        probe
            .metadata
            .annotations?
            .contains_key(paddock_admission::mutate::DEFAULTED_ANNOTATION)
            .then_some(())
    })
    .await;
    let in_watched = |resource: ApiResource| {
        Api::<DynamicObject>::namespaced_with(admin.clone(), watched.name(), &resource)
    };
    let dvs = in_watched(data_volumes());
    let vms = in_watched(virtual_machines());
    let listings = in_watched(baffles_applications());
    let ssh_secret = paddock_api::builders::ssh_keys_secret_name("rbac");
    let watched_secrets: Api<Secret> = Api::namespaced(admin.clone(), watched.name());
    wait_for("the DataVolume", async || {
        dvs.get_opt(&paddock_api::builders::data_volume_name("rbac"))
            .await
            .ok()?
            .map(|_| ())
    })
    .await;
    wait_for("the VirtualMachine", async || {
        vms.get_opt("rbac").await.ok()?.map(|_| ())
    })
    .await;
    wait_for("the BafflesApplication", async || {
        listings.get_opt("rbac").await.ok()?.map(|_| ())
    })
    .await;
    wait_for("the SSH keys Secret", async || {
        watched_secrets.get_opt(&ssh_secret).await.ok()?.map(|_| ())
    })
    .await;
    wait_for("the app's status", async || {
        let app = apps.get("rbac").await.ok()?;
        app.data
            .get("status")?
            .get("conditions")?
            .as_array()?
            .first()
            .map(|_| ())
    })
    .await;
    // Pruning (delete) and a spec edit flowing to the VM (apply of an existing object).
    apps.patch(
        "rbac",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"cloudInit": null, "runStrategy": "Halted"}})),
    )
    .await
    .unwrap();
    wait_for("the pruned SSH keys Secret", async || {
        watched_secrets
            .get_opt(&ssh_secret)
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    wait_for("runStrategy Halted on the VM", async || {
        let vm = vms.get("rbac").await.ok()?;
        (vm.data["spec"]["runStrategy"] == "Halted").then_some(())
    })
    .await;

    let snapshots = in_watched(paddock_tests::world::virtual_machine_snapshots());
    wait_for("a scheduled VirtualMachineSnapshot", async || {
        (!snapshots.list(&Default::default()).await.ok()?.items.is_empty()).then_some(())
    })
    .await;
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(admin.clone(), watched.name());
    wait_for("the SnapshotCreated Event", async || {
        events
            .list(&Default::default())
            .await
            .ok()?
            .items
            .iter()
            .any(|event| event.reason.as_deref() == Some("SnapshotCreated"))
            .then_some(())
    })
    .await;

    // Uninstall: Helm deletes the webhook configurations first, while the pods still run. The
    // operator must not bring them back (it has no create permission, and must not try).
    for object in &chart_configurations {
        let (resource, _) = api_resource(object);
        let api: Api<DynamicObject> = Api::all_with(admin.clone(), &resource);
        api.delete(&configuration, &Default::default()).await.unwrap();
    }
    wait_for("/readyz 503 without webhook configurations", async || {
        (readiness(port)? == 503).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(mutating.get_opt(&configuration).await.unwrap().is_none());
    assert!(validating.get_opt(&configuration).await.unwrap().is_none());

    // The controllers' caches sync under the chart's RBAC. A watcher refused while the test was
    // still applying RBAC retries with backoff, so wait for it rather than race the shutdown.
    wait_for(
        "the operator's caches to sync (\"caches synced; ready\" in its log)",
        async || {
            std::fs::read_to_string(&log)
                .ok()?
                .contains("caches synced; ready")
                .then_some(())
        },
    )
    .await;
    // A graceful stop releases the Lease (an update).
    let status = Command::new("kill")
        .args(["-TERM", &operator.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(40);
    let exit = loop {
        if let Some(exit) = operator.0.try_wait().unwrap() {
            break exit;
        }
        assert!(Instant::now() < deadline, "the operator did not stop on SIGTERM");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert!(exit.success(), "the operator failed: {exit}\n{stderr}");
    let lease = leases.get(&lease_name).await.unwrap();
    assert_eq!(lease.spec.unwrap().holder_identity, None, "{stderr}");
    eprintln!("--- the operator's log ---\n{stderr}");
    for expected in [
        "injected the webhook CA bundle",
        "caches synced; ready",
        "released the leader lease",
    ] {
        assert!(
            stderr.contains(expected),
            "the operator's log lacks {expected:?}:\n{stderr}"
        );
    }
    for refused in ["forbidden", "Forbidden", "403"] {
        assert!(
            !stderr.contains(refused),
            "the operator was refused a request under the chart's RBAC:\n{stderr}"
        );
    }
    // The rest of the uninstall: every chart object gone, no webhook configuration left behind.
    for object in objects.iter().filter(|object| {
        !["Deployment", "Service", "PodDisruptionBudget"].contains(&object["kind"].as_str().unwrap())
    }) {
        let (resource, namespaced) = api_resource(object);
        let api: Api<DynamicObject> = if namespaced {
            Api::namespaced_with(
                admin.clone(),
                object["metadata"]["namespace"].as_str().unwrap(),
                &resource,
            )
        } else {
            Api::all_with(admin.clone(), &resource)
        };
        let _ = api
            .delete(object["metadata"]["name"].as_str().unwrap(), &Default::default())
            .await;
    }
    let remaining_mutating: Vec<String> = mutating
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|object| object.metadata.name)
        .filter(|name| name == &configuration)
        .collect();
    let remaining_validating: Vec<String> = validating
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|object| object.metadata.name)
        .filter(|name| name == &configuration)
        .collect();
    assert!(remaining_mutating.is_empty() && remaining_validating.is_empty());
}

/// The status of `GET /readyz` on the webhook port (HTTPS, as the kubelet probes it: certificate
/// not verified), or `None` when nothing answers.
fn readiness(port: u16) -> Option<u16> {
    let output = Command::new("curl")
        .args(["-sk", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5"])
        .arg(format!("https://127.0.0.1:{port}/readyz"))
        .output()
        .ok()?;
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .ok()
        .filter(|code| *code != 0)
}

/// A rendered webhook configuration whose webhooks call `https://127.0.0.1:<port><path>` instead of
/// the chart's Service (there is no pod network in the test control plane).
fn loopback_configuration(object: &Value, port: u16) -> Value {
    let mut object = object.clone();
    for webhook in object["webhooks"].as_array_mut().unwrap() {
        let path = webhook["clientConfig"]["service"]["path"]
            .as_str()
            .unwrap()
            .to_owned();
        webhook["clientConfig"] = json!({"url": format!("https://127.0.0.1:{port}{path}")});
    }
    object
}

/// Whether every webhook of both configurations named `name` trusts `ca`.
async fn injected(
    mutating: &Api<MutatingWebhookConfiguration>,
    validating: &Api<ValidatingWebhookConfiguration>,
    name: &str,
    ca: &str,
) -> bool {
    let trusts = |bundle: Option<&k8s_openapi::ByteString>| {
        bundle.is_some_and(|bundle| String::from_utf8_lossy(&bundle.0).contains(ca.trim()))
    };
    let Ok(Some(mutating)) = mutating.get_opt(name).await else {
        return false;
    };
    let Ok(Some(validating)) = validating.get_opt(name).await else {
        return false;
    };
    let mutating = mutating.webhooks.unwrap_or_default();
    let validating = validating.webhooks.unwrap_or_default();
    !mutating.is_empty()
        && !validating.is_empty()
        && mutating
            .iter()
            .all(|webhook| trusts(webhook.client_config.ca_bundle.as_ref()))
        && validating
            .iter()
            .all(|webhook| trusts(webhook.client_config.ca_bundle.as_ref()))
}

/// A child process killed when the test ends early.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// The admin kubeconfig, impersonating `user` in `groups` (kubeconfig `as`/`as-groups`).
fn own_kubeconfig(cluster: &Cluster, directory: &Path, user: &str, groups: &[String]) -> PathBuf {
    let mut config: Value =
        serde_yaml::from_str(&std::fs::read_to_string(cluster.admin_kubeconfig()).unwrap()).unwrap();
    for entry in config["users"].as_array_mut().unwrap() {
        entry["user"]["as"] = json!(user);
        entry["user"]["as-groups"] = json!(groups);
    }
    let path = directory.join("operator.kubeconfig");
    std::fs::write(&path, serde_yaml::to_string(&config).unwrap()).unwrap();
    path
}

/// Deletes the cluster-scoped objects a test made (namespaced ones go with their namespaces).
struct Cleanup {
    kubectl: Command,
    objects: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = self
            .kubectl
            .args(["delete", "--ignore-not-found", "--wait=false"])
            .args(&self.objects)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
