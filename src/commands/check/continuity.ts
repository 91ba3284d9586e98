/**
 * Continuity with the buffer: the server is still the history the buffer holds
 * (source-history.ts), and the slot can deliver everything after the buffer's checkpoint — the
 * same rules a start applies (source-admin.ts findGap), printed as findings instead of thrown.
 */
import type pg from 'pg';
import type { SourceConfig } from '../../common/config.js';
import { formatBytes } from '../../common/lsn.js';
import { fixFor } from '../../common/error-policy.js';
import {
  retainedWalBytes,
  slotHolder,
  slotVerdict,
  type SlotState,
} from '../../common/source-admin.js';
import {
  compareHistory,
  divergenceSummary,
  storedHistoryOfRow,
} from '../../common/source-history.js';
import { durableRecordOf } from '../../buffer/reads.js';
import type { BufferRecord } from './buffer.js';
import type { AddFinding } from './finding.js';

/** Whether the server is still the history the buffer holds (see source-history.ts). */
export async function checkHistory(
  client: pg.Client,
  source: SourceConfig,
  record: BufferRecord,
  add: AddFinding,
): Promise<void> {
  const stored = storedHistoryOfRow(record.row);
  const identity = stored.identity;
  const { server, error } = await compareHistory(client, source, 'philotes:check', stored);
  if (error !== null) {
    add({
      check: 'history',
      verdict: 'blocker',
      code: error.code,
      detail: divergenceSummary(error),
      fix: fixFor(error.code, source),
    });
    return;
  }
  const now = server.identity;
  add({
    check: 'history',
    verdict: 'ok',
    detail:
      identity === null
        ? `system ${now.systemId}, timeline ${now.timeline} (the buffer has not recorded an identity for this source yet: the next start records it)`
        : `the same server and history as the buffer's events (system ${now.systemId}, timeline ${now.timeline}${now.timeline !== identity.timeline ? `, which left timeline ${identity.timeline} after the checkpoint` : ''})`,
    fix: null,
  });
}

export async function checkSlot(
  client: pg.Client,
  source: SourceConfig,
  slot: SlotState | null,
  wal: bigint,
  settings: { max_slots: string; max_senders: string; slots: number; senders: number },
  record: BufferRecord | null,
  bufferRead: boolean,
  add: AddFinding,
): Promise<void> {
  const name = `slot ${source.slot}`;
  // The same verdict a start throws: printed here with the way out as the fix.
  const problem = slotVerdict(source, slot, wal, record === null ? null : durableRecordOf(record));
  const continuityProblem = problem?.error.code === 'SLOT_ADVANCED' ? problem : null;
  if (problem !== null && continuityProblem === null) {
    add({
      check: 'slot',
      verdict: 'blocker',
      code: problem.error.code,
      detail: problem.what,
      fix: fixFor(problem.error.code, source),
    });
  } else if (slot === null) {
    if (settings.slots >= Number(settings.max_slots)) {
      add({
        check: 'slot',
        verdict: 'blocker',
        code: 'NO_FREE_SLOT',
        detail: `${name} does not exist and all ${settings.max_slots} replication slots are taken`,
        fix: fixFor('NO_FREE_SLOT', source),
      });
    } else {
      add({
        check: 'slot',
        verdict: 'ok',
        detail: `${name} does not exist yet: the first start creates it`,
        fix: null,
      });
    }
  } else {
    const retained = retainedWalBytes(slot, wal);
    const holds = retained === null ? '' : `, retains ${formatBytes(BigInt(retained))} of WAL`;
    const owner =
      slot.activePid === null ? '' : (await slotHolder(client, slot.activePid)).applicationName;
    if (slot.active && !owner.startsWith('philotes')) {
      add({
        check: 'slot',
        verdict: 'blocker',
        detail: `${name} is in use by ${owner || 'another client'} (pid ${slot.activePid})${holds}`,
        fix: 'stop that client; only one consumer can stream a slot',
      });
    } else if (slot.walStatus === 'unreserved') {
      add({
        check: 'slot',
        verdict: 'warning',
        detail: `${name} has wal_status unreserved${holds}: the server is about to remove WAL it needs`,
        fix: 'let Philotes catch up now, or raise max_slot_wal_keep_size',
      });
    } else {
      add({
        check: 'slot',
        verdict: 'ok',
        detail: `${name}, wal_status ${slot.walStatus ?? 'unknown'}${holds}${slot.active ? `, streamed by ${owner} (pid ${slot.activePid})` : ', not in use'}`,
        fix: null,
      });
    }
    if (record !== null) {
      add(
        continuityProblem !== null
          ? {
              check: 'continuity',
              verdict: 'blocker',
              code: continuityProblem.error.code,
              detail: continuityProblem.what,
              fix: fixFor(continuityProblem.error.code, source),
            }
          : {
              check: 'continuity',
              verdict: 'ok',
              detail: `the slot can deliver everything after the checkpoint ${record.lsn}`,
              fix: null,
            },
      );
    }
  }
  if (!bufferRead) {
    add({
      check: 'continuity',
      verdict: 'warning',
      detail: 'the buffer could not be read: the slot was not compared with its checkpoint',
      fix: null,
    });
  }
  const senders = Number(settings.max_senders) - settings.senders;
  if (!slot?.active && senders <= 0) {
    add({
      check: 'wal_senders',
      verdict: 'blocker',
      detail: `all ${settings.max_senders} WAL senders are in use`,
      fix: 'raise max_wal_senders (restart)',
    });
  }
}
