/**
 * Public API of @burrow/pki: create a Burrow PKI directory, issue SPIFFE X509-SVID style
 * certificates from it (directly or from CSRs), enroll agents with join tokens, rotate CAs,
 * revoke certificates and check expiry. See pki-dir.ts for the on-disk layout.
 */
export { PkiError } from './pki-error';
export {
  securePrivateDir,
  securePkiDir,
  describeTightened,
  formatMode,
  type PrivateDirOutcome,
} from './private-dir';
export { parseDuration } from './duration';
export { ROLES, NAME_PATTERN, type Role } from './validation';
export { KEY_ALGORITHMS, DEFAULT_KEY_ALGORITHM, type KeyAlgorithm } from './key-algorithm';
export { spiffeIdFor, parseSpiffeId, type SpiffeIdParts } from './spiffe-id';
export {
  initPki,
  DEFAULT_TRUST_DOMAIN,
  DEFAULT_ROOT_TTL_MS,
  DEFAULT_ISSUING_TTL_MS,
  NOT_BEFORE_BACKDATE_MS,
  type InitOptions,
} from './certificate-authority';
export {
  issueCertificate,
  writeIssued,
  DEFAULT_LEAF_TTL_MS,
  ISSUED_FILES,
  type IssueOptions,
  type IssuedCertificate,
} from './issue';
export {
  loadPki,
  clearPkiCache,
  isPkiInitialised,
  MANIFEST_FILE,
  TRUST_BUNDLE_FILE,
  PKI_FORMAT_VERSION,
  type LoadedPki,
  type LoadedCa,
  type PkiManifest,
  type CaRecord,
  type CaKind,
  type RotationRecord,
  type RetiredCaRecord,
} from './pki-dir';
export {
  createJoinToken,
  parseJoinToken,
  consumeJoinToken,
  recordTokenCertificate,
  caPinOf,
  trustBundlePins,
  EnrollmentError,
  TOKEN_PREFIX,
  TOKEN_PREFIX_V2,
  DEFAULT_JOIN_TOKEN_TTL_MS,
  type JoinTokenInfo,
  type ParsedJoinToken,
  type EnrollmentFailureReason,
} from './join-token';
export { createCsr, csrPublicKeySha256, signCsr, type SignCsrOptions } from './csr';
export {
  rotate,
  rotationState,
  trustBundle,
  recordAgentState,
  agentStates,
  ROTATE_ACTIONS,
  type RotationPhase,
  type RotateAction,
  type RotationState,
  type RotationCaState,
  type RotateOptions,
  type AgentState,
} from './rotation';
export {
  revoke,
  loadRevocations,
  writeCrl,
  REVOCATIONS_FILE,
  type RevocationList,
  type RevokeOptions,
  type WriteCrlOptions,
} from './revocation';
export { checkPki, DEFAULT_WARN_DAYS, type PkiCheckResult } from './check';
