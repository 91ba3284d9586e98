/**
 * What the operator commands print: a plain table (readable on a terminal and in a log), or, with
 * --json, one JSON document for scripts. Cells are strings already; null prints as "-".
 */

import { formatBytes } from '../common/lsn.js';

export type Cell = string | number | boolean | null;

/** Left-aligned columns, two spaces apart, a header line and a rule under it. */
export function formatTable(
  headers: readonly string[],
  rows: readonly (readonly Cell[])[],
): string {
  const text = (cell: Cell): string => (cell === null ? '-' : String(cell));
  const widths = headers.map((h, i) =>
    Math.max(h.length, ...rows.map((row) => text(row[i] ?? null).length)),
  );
  const line = (cells: readonly string[]) =>
    cells
      .map((c, i) => c.padEnd(widths[i]!))
      .join('  ')
      .trimEnd();
  return [
    line(headers),
    line(widths.map((w) => '-'.repeat(w))),
    ...rows.map((row) => line(headers.map((_, i) => text(row[i] ?? null)))),
  ].join('\n');
}

/** Bytes for a person ("4.5 MB"), or null. */
export function humanBytes(bytes: number | null): string | null {
  return bytes === null ? null : formatBytes(BigInt(Math.round(bytes)));
}

/** Seconds for a person: 42s, 3m 5s, 2h 10m, 4d 1h. */
export function humanSeconds(seconds: number | null): string | null {
  if (seconds === null) return null;
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
  if (s < 86_400) return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
  return `${Math.floor(s / 86_400)}d ${Math.floor((s % 86_400) / 3600)}h`;
}
