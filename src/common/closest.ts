/** Did-you-mean: the nearest known word to a misspelt one (a config key, a command, a source). */
import type { Config } from './config.js';

/** The known key nearest to a misspelt one (edit distance at most 2, or a case slip). */
export function closest(key: string, known: readonly string[]): string | undefined {
  let best: string | undefined;
  let bestDistance = 3;
  for (const candidate of known) {
    const d = candidate.toLowerCase() === key.toLowerCase() ? 0 : editDistance(key, candidate);
    if (d < bestDistance) {
      best = candidate;
      bestDistance = d;
    }
  }
  return best;
}

function editDistance(a: string, b: string): number {
  const row = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    let diagonal = row[0]!;
    row[0] = i;
    for (let j = 1; j <= b.length; j++) {
      const above = row[j]!;
      row[j] = Math.min(row[j]! + 1, row[j - 1]! + 1, diagonal + (a[i - 1] === b[j - 1] ? 0 : 1));
      diagonal = above;
    }
  }
  return row[b.length]!;
}

/** What a command says for a --source that is not configured: the nearest id, and all of them. */
export function unknownSource(config: Config, id: string): string {
  const ids = config.sources.map((s) => s.id);
  const near = closest(id, ids);
  return `unknown source "${id}"${near ? ` (did you mean "${near}"?)` : ''}; configured: ${ids.join(', ')}`;
}
