/** What /proc says about a process: CPU time and peak memory, for the benchmarks. */
import { readFileSync } from 'node:fs';

/**
 * CPU seconds from /proc/pid/stat: the process's own (utime + stime, fields 14 and 15; every
 * thread) and that of its children it has reaped (cutime + cstime, fields 16 and 17). Clock
 * ticks are 1/100 s.
 */
export function cpuSeconds(pid: number): { own: number; children: number } {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  // Fields counted from the state (field 3), after the ')' closing the command name.
  const f = stat
    .slice(stat.lastIndexOf(')') + 2)
    .split(' ')
    .map(Number);
  return { own: (f[11]! + f[12]!) / 100, children: (f[13]! + f[14]!) / 100 };
}

/** The process's resident set now (VmRSS) and at its peak (VmHWM), in MB, unrounded. */
export function memoryMb(pid: number): { rss: number; peak: number } {
  const status = readFileSync(`/proc/${pid}/status`, 'utf8');
  const kb = (key: string) => Number(new RegExp(`${key}:\\s+(\\d+) kB`).exec(status)?.[1] ?? 0);
  return { rss: kb('VmRSS') / 1024, peak: kb('VmHWM') / 1024 };
}

/** The process's peak resident set (VmHWM), in MB. */
export function peakRssMb(pid: number): number {
  return Math.round(memoryMb(pid).peak);
}
