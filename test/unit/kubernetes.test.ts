/**
 * deploy/kubernetes/ validated, not by eye: every manifest against the Kubernetes and
 * prometheus-operator schemas (kubernetes-models), the PrometheusRule equal to the shipped alert
 * rules, the ConfigMap's configuration accepted by Philotes' own loader, and the rules the
 * manifests must keep (probes, grace period above the shutdown timeout, non-root, read-only root).
 */
import { mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { parse, parseAllDocuments } from 'yaml';
import { ConfigMap, Service } from 'kubernetes-models/v1';
import { Deployment } from 'kubernetes-models/apps/v1';
import { PodDisruptionBudget } from 'kubernetes-models/policy/v1';
import { ServiceMonitor } from '@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor';
import { PrometheusRule } from '@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PrometheusRule';
import {
  PROMETHEUS_RULE_FILE,
  RULES_FILE,
  prometheusRule,
} from '../../deploy/kubernetes/generate-rules.js';
import { loadConfigFile } from '../../src/common/config-file.js';

const DIR = fileURLToPath(new URL('../../deploy/kubernetes/', import.meta.url));

type Manifest = { apiVersion: string; kind: string; metadata: { name: string } } & Record<
  string,
  unknown
>;

const MODELS: Record<string, new (data: never) => { validate(): void }> = {
  'v1/ConfigMap': ConfigMap,
  'v1/Service': Service,
  'apps/v1/Deployment': Deployment,
  'policy/v1/PodDisruptionBudget': PodDisruptionBudget,
  'monitoring.coreos.com/v1/ServiceMonitor': ServiceMonitor,
  'monitoring.coreos.com/v1/PrometheusRule': PrometheusRule,
};

function manifests(): Array<{ file: string; doc: Manifest }> {
  const kustomization = parse(readFileSync(join(DIR, 'kustomization.yaml'), 'utf8')) as {
    resources: string[];
  };
  return kustomization.resources.flatMap((file) =>
    parseAllDocuments(readFileSync(join(DIR, file), 'utf8')).map((d) => ({
      file,
      doc: d.toJS() as Manifest,
    })),
  );
}

function one<T>(kind: string): T {
  const found = manifests().filter((m) => m.doc.kind === kind);
  expect(found, kind).toHaveLength(1);
  return found[0]!.doc as unknown as T;
}

describe('deploy/kubernetes', () => {
  it('lists every manifest of the directory in its kustomization', () => {
    const listed = new Set(manifests().map((m) => m.file));
    const files = readdirSync(DIR).filter((f) => f.endsWith('.yaml') && f !== 'kustomization.yaml');
    expect([...listed].sort()).toEqual(files.sort());
  });

  it('validates every manifest against its schema', () => {
    for (const { file, doc } of manifests()) {
      const Model = MODELS[`${doc.apiVersion}/${doc.kind}`];
      expect(Model, `${file}: ${doc.apiVersion} ${doc.kind} has no model here`).toBeDefined();
      expect(() => new Model!(doc as never).validate(), file).not.toThrow();
    }
  });

  it('catches a broken manifest (the validation is not a no-op)', () => {
    const deployment = structuredClone(one<Record<string, unknown>>('Deployment'));
    (deployment['spec'] as Record<string, unknown>)['replicas'] = 'three';
    expect(() => new Deployment(deployment as never).validate()).toThrow(/replicas/);
  });

  it('ships a PrometheusRule equal to grafana/alerts/philotes-rules.yml (npm run deploy:rules)', () => {
    expect(readFileSync(PROMETHEUS_RULE_FILE, 'utf8')).toBe(
      prometheusRule(readFileSync(RULES_FILE, 'utf8')),
    );
  });

  it("holds a configuration Philotes' loader accepts, with the passwords from the Secret", () => {
    const map = one<{ data: Record<string, string> }>('ConfigMap');
    const dir = mkdtempSync(join(tmpdir(), 'philotes-k8s-'));
    try {
      // The Secret's files, where the Deployment mounts them.
      const text = map.data['philotes.yaml']!.replaceAll('/etc/philotes/secrets/', `${dir}/`);
      for (const secret of text.matchAll(/passwordFile: (\S+)/g)) writeFileSync(secret[1]!, 'pw');
      writeFileSync(join(dir, 'philotes.yaml'), text);
      const config = loadConfigFile(join(dir, 'philotes.yaml'), {});
      expect(config.sources.length).toBeGreaterThan(1);
      expect(config.buffer.password).toBe('pw');

      const deployment = one<{
        spec: {
          replicas: number;
          template: {
            spec: {
              terminationGracePeriodSeconds: number;
              securityContext: { runAsNonRoot: boolean };
              containers: Array<{
                args: string[];
                livenessProbe: { httpGet: { path: string } };
                readinessProbe: { httpGet: { path: string } };
                securityContext: { readOnlyRootFilesystem: boolean };
                volumeMounts: Array<{ mountPath: string; subPath?: string }>;
              }>;
              volumes: Array<{ secret?: { secretName: string } }>;
            };
          };
        };
      }>('Deployment');
      const pod = deployment.spec.template.spec;
      const container = pod.containers[0]!;
      expect(deployment.spec.replicas).toBeGreaterThan(1);
      // A stop ends cleanly (leases released) before the kubelet kills the process.
      expect(pod.terminationGracePeriodSeconds * 1000).toBeGreaterThan(config.shutdownTimeoutMs);
      expect(container.livenessProbe.httpGet.path).toBe('/healthz');
      expect(container.readinessProbe.httpGet.path).toBe('/readyz');
      expect(pod.securityContext.runAsNonRoot).toBe(true);
      expect(container.securityContext.readOnlyRootFilesystem).toBe(true);
      // The config the container is started with is the ConfigMap's, where it is mounted; no
      // subPath, so that updates (ConfigMap, rotated Secret) reach the files.
      const configPath = container.args[container.args.indexOf('--config') + 1]!;
      expect(
        container.volumeMounts.some((m) => configPath.startsWith(`${m.mountPath}/`)),
        configPath,
      ).toBe(true);
      expect(container.volumeMounts.filter((m) => m.subPath !== undefined)).toEqual([]);
      for (const source of [config.buffer, ...config.sources.map((s) => s.connection)])
        expect(source.passwordFile?.startsWith(dir)).toBe(true);
      expect(pod.volumes.some((v) => v.secret?.secretName === 'philotes-passwords')).toBe(true);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
