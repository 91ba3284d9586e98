/** What the demo prints: progress steps, headings, tables, shortened JSON. */
import { readFileSync } from 'node:fs';

export const seconds = (ms: number): string => `${(ms / 1000).toFixed(1)} s`;

/** The terminal: remembers whether a progress line is still open. */
export class Output {
  private lineOpen = false;

  say(text = ''): void {
    if (this.lineOpen) process.stdout.write('\n');
    this.lineOpen = false;
    process.stdout.write(`${text}\n`);
  }

  /** Ends an open progress line before something else is printed (an interrupt's message). */
  endLine(): void {
    if (this.lineOpen) process.stdout.write('\n');
    this.lineOpen = false;
  }

  /** One progress line: "▸ title … done (1.2 s)". */
  async step<T>(title: string, fn: () => Promise<T>, detail?: (v: T) => string): Promise<T> {
    if (this.lineOpen) process.stdout.write('\n');
    process.stdout.write(`▸ ${title} … `);
    this.lineOpen = true;
    const started = performance.now();
    const value = await fn();
    const extra = detail ? `${detail(value)}, ` : '';
    const tail = `done (${extra}${seconds(performance.now() - started)})`;
    if (this.lineOpen) process.stdout.write(`${tail}\n`);
    else process.stdout.write(`  ${title}: ${tail}\n`);
    this.lineOpen = false;
    return value;
  }

  heading(title: string): void {
    this.say();
    this.say(title);
    this.say('─'.repeat(Math.min(title.length, 80)));
  }

  /** Table rows with left-aligned first column and right-aligned others. */
  table(rows: ReadonlyArray<readonly string[]>, indent = '  '): void {
    const widths: number[] = [];
    for (const row of rows)
      row.forEach((cell, i) => (widths[i] = Math.max(widths[i] ?? 0, cell.length)));
    for (const row of rows) {
      const cells = row.map((cell, i) =>
        i === 0 ? cell.padEnd(widths[i] ?? 0) : cell.padStart(widths[i] ?? 0),
      );
      this.say(`${indent}${cells.join('   ')}`.trimEnd());
    }
  }
}

/**
 * Shortens long string literals inside JSON text for display. Works on the text (never parses
 * it), so numbers stay exactly as stored: jsonb keeps 20-digit numbers that JSON.parse would round.
 */
export function shortenJson(json: string, max = 48): string {
  return json.replace(/"((?:[^"\\]|\\.)*)"/g, (literal, body: string) => {
    if (body.length <= max) return literal;
    let cut = body.slice(0, max);
    // Do not end inside an escape sequence.
    const escape = /\\(u[0-9a-fA-F]{0,3})?$/.exec(cut);
    if (escape) cut = cut.slice(0, escape.index);
    return `"${cut}…(${body.length} chars)"`;
  });
}

/** The last `n` non-empty lines of a file, or none if it cannot be read. */
export function tail(file: string, n: number): string[] {
  try {
    return readFileSync(file, 'utf8')
      .split('\n')
      .filter((l) => l.trim() !== '')
      .slice(-n);
  } catch {
    return [];
  }
}

/** A Philotes JSON log line as "level msg: err". */
export function readable(line: string): string {
  try {
    const e = JSON.parse(line) as { level?: string; msg?: string; err?: { message?: string } };
    return `${e.level ?? '?'} ${e.msg ?? ''}${e.err?.message ? `: ${e.err.message}` : ''}`;
  } catch {
    return line;
  }
}
