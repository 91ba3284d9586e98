/**
 * The PrometheusRule in this directory is made from the alert rules Philotes ships
 * (grafana/alerts/philotes-rules.yml): one source of truth. Run `npm run deploy:rules` after
 * changing the rules; test/unit/kubernetes.test.ts fails while the two differ.
 */
import { readFileSync, writeFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { parse, stringify } from 'yaml';

const ROOT = new URL('../../', import.meta.url);
export const RULES_FILE = fileURLToPath(new URL('grafana/alerts/philotes-rules.yml', ROOT));
export const PROMETHEUS_RULE_FILE = fileURLToPath(
  new URL('deploy/kubernetes/prometheusrule.yaml', ROOT),
);

/** The PrometheusRule manifest for a Prometheus rules file's text. */
export function prometheusRule(rulesYaml: string): string {
  const rules = parse(rulesYaml) as { groups: unknown[] };
  const manifest = {
    apiVersion: 'monitoring.coreos.com/v1',
    kind: 'PrometheusRule',
    metadata: { name: 'philotes', labels: { 'app.kubernetes.io/name': 'philotes' } },
    spec: { groups: rules.groups },
  };
  return [
    '# Generated from grafana/alerts/philotes-rules.yml by `npm run deploy:rules`: edit that file.',
    stringify(manifest, { lineWidth: 0 }),
  ].join('\n');
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  writeFileSync(PROMETHEUS_RULE_FILE, prometheusRule(readFileSync(RULES_FILE, 'utf8')));
  console.log(`wrote ${PROMETHEUS_RULE_FILE}`);
}
