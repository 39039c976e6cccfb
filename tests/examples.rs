//! Every example configuration shipped (zones/*.toml, and those inside packaging/) parses and
//! validates, so none can rot unnoticed. The e2e suite also runs `mskdns check` on zones/.

use std::path::{Path, PathBuf};

use mskdns::config::Config;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The block under `mskdns.toml: |` in a Kubernetes manifest, dedented.
fn configmap_block(yaml: &str) -> Option<String> {
    let mut lines = yaml.lines().skip_while(|l| !l.trim_end().ends_with("mskdns.toml: |")).skip(1).peekable();
    let indent = lines.peek()?.len() - lines.peek()?.trim_start().len();
    let block: Vec<&str> =
        lines.take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() >= indent).collect();
    Some(block.iter().map(|l| l.get(indent..).unwrap_or("")).collect::<Vec<_>>().join("\n"))
}

/// Every `<<CONF` here-document of a CloudFormation template, dedented, with its `${…}`
/// parameters given example values.
fn heredocs(yaml: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut lines = yaml.lines();
    while let Some(l) = lines.next() {
        if !l.contains("mskdns.toml <<CONF") {
            continue;
        }
        let body: Vec<&str> = lines.by_ref().take_while(|l| l.trim() != "CONF").collect();
        let text = body.iter().map(|l| l.trim_start()).collect::<Vec<_>>().join("\n");
        out.push(text.replace("${UpstreamResolver}", "10.0.0.2").replace("${VpcCidr}", "10.0.0.0/16"));
    }
    out
}

fn check(what: &Path, text: &str) {
    assert!(!text.contains("${"), "{}: a parameter left unreplaced", what.display());
    let c = Config::from_toml(text).unwrap_or_else(|e| panic!("{}: {e}", what.display()));
    c.validate().unwrap_or_else(|e| panic!("{}: {e}", what.display()));
}

#[test]
fn every_example_configuration_parses_and_validates() {
    let mut seen = Vec::new();
    for entry in std::fs::read_dir(root().join("zones")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            check(&path, &std::fs::read_to_string(&path).unwrap());
            seen.push(path);
        }
    }
    // node-local.yaml takes its configuration from central's ConfigMap and overrides by variable.
    let path = root().join("packaging/kubernetes/central.yaml");
    let block = configmap_block(&std::fs::read_to_string(&path).unwrap()).expect("a mskdns.toml ConfigMap");
    assert!(block.contains("[[clusters]]"), "{block}");
    check(&path, &block);
    seen.push(path);
    let cfn = root().join("packaging/cloudformation/mskdns.yaml");
    let docs = heredocs(&std::fs::read_to_string(&cfn).unwrap());
    assert_eq!(docs.len(), 2, "one configuration per instance");
    for d in &docs {
        check(&cfn, d);
    }
    assert!(seen.len() >= 4, "{seen:?}");
}
