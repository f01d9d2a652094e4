// Type declarations of node.js (the Node entry point): everything of
// livecast.js, plus the credential headers and the upgrade probe.

import type { CheckAuth, ClientOptions, LivecastClient } from './livecast.js';

export * from './livecast.js';

/** The HTTP status of an upgrade request to `url` (101 when it would open), or null without an answer. */
export function upgradeStatus(
  url: string,
  headers?: Record<string, string>,
  options?: { timeoutMs?: number },
): Promise<number | null>;

/** checkAuth that repeats the failed upgrade and reads its status: 401/403 → unauthorized. */
export function upgradeProbe(url: string, headers?: Record<string, string>, options?: { timeoutMs?: number }): CheckAuth;

/** A client for Node: `url` required, credential as `cookie` or `bearer`, refused upgrades probed. */
export function createNodeClient(options: ClientOptions & { url: string }): LivecastClient;
