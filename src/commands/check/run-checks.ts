/**
 * A preflight of the buffer and every configured source that changes nothing — no migration, no
 * slot, no publication. Sources are checked at once, each on its own connection; one that cannot
 * be reached is a blocker in its own rows and hides nothing else. The printer: ../check.ts.
 */
import type { Config } from '../../common/config.js';
import { checkBuffer } from './buffer.js';
import type { Finding } from './finding.js';
import { runningFindings } from './running.js';
import { checkSource } from './source.js';

export async function runChecks(config: Config): Promise<Finding[]> {
  const buffer = await checkBuffer(config);
  const perSource = await Promise.all(
    config.sources.map(async (source) => [
      ...runningFindings(source, buffer.reports.get(source.id) ?? []),
      ...(await checkSource(
        source,
        buffer.records?.get(source.id) ?? null,
        buffer.records !== null,
      )),
    ]),
  );
  return [...buffer.findings, ...perSource.flat()];
}
