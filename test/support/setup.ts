// Loaded by vitest.config.ts into every test file: whatever a failing test left behind (a
// cluster, a running CLI) is removed when its file ends, not only when the fork exits.
import { afterAll } from 'vitest';
import { destroyAllClusters } from './cluster.js';
import { killAllPhilotes } from './philotes.js';

afterAll(async () => {
  // The CLI first: it holds connections to the clusters.
  await killAllPhilotes();
  await destroyAllClusters();
});
