import { PROTO_DIR, listProtoFiles, loadProto, seaAssets } from '@burrow/tunnel';

/** What {@link selfCheck} found; every field was exercised, not just loaded. */
export interface SelfCheckResult {
  /** Whether this process is the single executable (`make agent-binary`). */
  singleExecutable: boolean;
  /** Proto files parsed and resolved, relative to PROTO_DIR. */
  protos: string[];
  /** Version of the Cedar engine that evaluated the test policy. */
  cedarVersion: string;
  /** JWS algorithm of the token jose signed and verified. */
  joseAlgorithm: string;
}

// The few jose functions used here. jose ships ESM only with no top-level "types", which this
// repository's CommonJS module resolution cannot see; Node 20.19+ loads it with require().
interface Jose {
  generateKeyPair(alg: string): Promise<{ publicKey: unknown; privateKey: unknown }>;
  SignJWT: new (
    payload: Record<string, unknown>,
  ) => {
    setProtectedHeader(h: { alg: string }): {
      setIssuer(i: string): { setExpirationTime(t: string): { sign(k: unknown): Promise<string> } };
    };
  };
  jwtVerify(jwt: string, key: unknown, opts: { issuer: string }): Promise<{ payload: Record<string, unknown> }>;
}

const SELF_CHECK_POLICY = 'permit(principal == Agent::"self-check", action == Action::"call", resource);';

function check(condition: boolean, what: string): void {
  if (!condition) throw new Error(`self-check failed: ${what}`);
}

/**
 * Proves that everything the agent loads lazily is really there, which is what can go missing from
 * a bundled single executable: every proto under PROTO_DIR parses and resolves, the Cedar wasm
 * engine instantiates and evaluates a one-line policy both ways, and jose signs and verifies a JWT.
 * Run by `burrow-agent self-check` (hidden) at build time and by the tests. Rejects with the first
 * failure. Makes no network connection.
 */
export async function selfCheck(): Promise<SelfCheckResult> {
  const protos = listProtoFiles(PROTO_DIR);
  check(protos.includes('burrow/tunnel/v1/tunnel.proto'), `tunnel.proto is not among the protos in ${PROTO_DIR}`);
  for (const file of protos) {
    try {
      loadProto(file).resolveAll();
    } catch (err) {
      throw new Error(`self-check failed: ${file}: ${(err as Error).message}`, { cause: err });
    }
  }

  // Required here, not at the top: instantiating the 4 MiB wasm module costs time and memory the
  // agent does not spend until policy code needs it.
  const cedar = require('@cedar-policy/cedar-wasm/nodejs') as typeof import('@cedar-policy/cedar-wasm/nodejs');
  const decide = (id: string): string => {
    const answer = cedar.isAuthorized({
      principal: { type: 'Agent', id },
      action: { type: 'Action', id: 'call' },
      resource: { type: 'Service', id: 'x' },
      context: {},
      policies: { staticPolicies: SELF_CHECK_POLICY },
      entities: [],
    });
    if (answer.type !== 'success')
      throw new Error(`self-check failed: cedar: ${answer.errors.map((e) => e.message).join('; ')}`);
    return answer.response.decision;
  };
  check(decide('self-check') === 'allow', 'cedar denied the principal its policy permits');
  check(decide('someone-else') === 'deny', 'cedar allowed a principal no policy permits');

  const jose = require('jose') as Jose;
  const alg = 'ES256';
  const { publicKey, privateKey } = await jose.generateKeyPair(alg);
  const jwt = await new jose.SignJWT({ sub: 'self-check' })
    .setProtectedHeader({ alg })
    .setIssuer('burrow-agent')
    .setExpirationTime('1m')
    .sign(privateKey);
  const verified = await jose.jwtVerify(jwt, publicKey, { issuer: 'burrow-agent' });
  check(verified.payload.sub === 'self-check', 'jose verified a token with the wrong subject');

  return {
    singleExecutable: seaAssets() !== undefined,
    protos,
    cedarVersion: cedar.getCedarVersion(),
    joseAlgorithm: alg,
  };
}
