/**
 * @burrow/policy: the Cedar policy engine shared by the agent (site decisions) and the broker (caller authorization).
 */
export * from './policy-engine';
export * from './policy-input';
export * from './input-bounds';
export * from './policy-set-loader';
export * from './policy-metrics';
export * from './decision-cache';
export * from './audit-log';
export * from './entity-store';
export * from './cedar-text';
