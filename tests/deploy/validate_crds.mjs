// Validates Prometheus Operator resources (ServiceMonitor, PrometheusRule) against the Operator's
// CRD schemas, as compiled by @kubernetes-models/prometheus-operator (installed in .tools by
// scripts/install_tools.sh). Usage: node validate_crds.mjs NODE_MODULES_DIR < resources.json
// (a JSON array). Prints one line per resource; exits 1 if any is invalid.
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const modules = process.argv[2];
const kinds = ["ServiceMonitor", "PrometheusRule"];
const models = {};
for (const kind of kinds) {
  const file = join(modules, "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1", `${kind}.js`);
  models[kind] = (await import(pathToFileURL(file).href))[kind];
}

let failed = 0;
for (const resource of JSON.parse(readFileSync(0, "utf8"))) {
  const name = `${resource.kind}/${resource.metadata?.name}`;
  const Model = resource.apiVersion === "monitoring.coreos.com/v1" ? models[resource.kind] : undefined;
  if (!Model) {
    console.log(`FAIL ${name}: not a monitoring.coreos.com/v1 ${kinds.join(" or ")}`);
    failed++;
    continue;
  }
  try {
    new Model(resource).validate();
    console.log(`ok ${name}`);
  } catch (error) {
    console.log(`FAIL ${name}: ${error.message}`);
    failed++;
  }
}
process.exit(failed ? 1 : 0);
