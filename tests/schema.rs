//! `backflow schema`: JSON Schemas (draft 2020-12) of backflow.yaml and of
//! sync files, checked with a JSON Schema validator against every example
//! file, broken files, and the copies committed under `schemas/`.

mod common;

use common::{bin, finish, repo};

fn schema(which: &str) -> serde_json::Value {
    let out = finish(bin().args(["schema", which]).output().unwrap());
    assert_eq!(out.code, 0, "{}", out.all());
    serde_json::from_str(&out.stdout).unwrap()
}

fn yaml(text: &str) -> serde_json::Value {
    serde_saphyr::from_str(text).unwrap()
}

fn problems(validator: &jsonschema::Validator, value: &serde_json::Value) -> Vec<String> {
    validator.iter_errors(value).map(|e| format!("{} at {}", e, e.instance_path())).collect()
}

#[test]
fn the_sync_schema_accepts_every_example_and_rejects_broken_files() {
    let schema = schema("sync");
    assert_eq!(schema["$schema"], "https://json-schema.org/draft/2020-12/schema");
    let committed: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(repo().join("schemas/sync.schema.json")).unwrap()).unwrap();
    assert_eq!(
        committed, schema,
        "schemas/sync.schema.json is stale: run `backflow schema sync > schemas/sync.schema.json`"
    );
    let validator = jsonschema::draft202012::new(&schema).unwrap();
    let mut checked = 0;
    for entry in std::fs::read_dir(repo().join("syncs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|x| x == "yaml") {
            let text = std::fs::read_to_string(&path).unwrap();
            assert!(
                text.starts_with("# yaml-language-server: $schema=../schemas/sync.schema.json"),
                "{} names its schema for editors",
                path.display()
            );
            let errors = problems(&validator, &yaml(&text));
            assert!(errors.is_empty(), "{}: {errors:?}", path.display());
            checked += 1;
        }
    }
    assert!(checked >= 5);
    let good = "warehouse: demo\nquery: select 1 as id\nprimary_key: id\nmode: upsert\n\
                destination: {url: \"https://example.com/hook\", timeout: 10s, rate_limit: 50/s}\n\
                schedule: {every: 15m}\ntags: [crm]\n";
    assert!(problems(&validator, &yaml(good)).is_empty(), "{:?}", problems(&validator, &yaml(good)));
    for (broken, why) in [
        (good.replace("mode: upsert", "mode: mirrorr"), "an unknown mode"),
        (good.replace("primary_key: id\n", ""), "no primary key"),
        (good.replace("tags: [crm]", "tagz: [crm]"), "an unknown key"),
        (good.replace("timeout: 10s", "timeout: soon"), "a duration that is not one"),
        (good.replace("rate_limit: 50/s", "rate_limit: fast"), "a rate that is not one"),
        (good.replace("primary_key: id", "primary_key: 7"), "a key that is not a column"),
    ] {
        assert!(!problems(&validator, &yaml(&broken)).is_empty(), "{why} is refused:\n{broken}");
    }
}

#[test]
fn the_project_schema_accepts_the_example_project_and_rejects_a_broken_one() {
    let schema = schema("project");
    let committed: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(repo().join("schemas/backflow.schema.json")).unwrap()).unwrap();
    assert_eq!(
        committed, schema,
        "schemas/backflow.schema.json is stale: run `backflow schema project > schemas/backflow.schema.json`"
    );
    let validator = jsonschema::draft202012::new(&schema).unwrap();
    let text = std::fs::read_to_string(repo().join("backflow.yaml")).unwrap();
    assert!(text.starts_with("# yaml-language-server: $schema=schemas/backflow.schema.json"));
    let errors = problems(&validator, &yaml(&text));
    assert!(errors.is_empty(), "{errors:?}");
    let described = serde_json::to_string(&schema).unwrap();
    assert!(described.contains("Runs in flight at once"), "doc comments are descriptions");
    for broken in [
        "warehouses: {w: {type: oracle, path: x}}\n",
        "warehouses: {w: {type: duckdb}}\nserve: {max_concurrent_runs: two}\n",
        "warehouses: {w: {type: duckdb}}\nstate: {folder: x}\n",
    ] {
        assert!(!problems(&validator, &yaml(broken)).is_empty(), "refused:\n{broken}");
    }
}
