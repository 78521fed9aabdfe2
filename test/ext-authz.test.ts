import { expect } from 'chai';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import * as http2 from 'node:http2';
import * as path from 'node:path';
import { type ServiceError, status as Status } from '@grpc/grpc-js';
import * as protobuf from 'protobufjs';
import * as YAML from 'yaml';
import { EXT_AUTHZ_CHECK_METHOD, brokerConfigFromArgs, serveDefaults } from '@burrow/broker';
import { API_CODECS, POLICY_METHODS, answerUnary } from '@burrow/tunnel';
import { EnvoyAuthzClient, envoyCheckRequest, headersOf, type DownstreamRequest } from './helpers/envoy-client';
import { GatewaySite } from './helpers/gateway-site';
import { PkiFixture } from './helpers/pki-fixture';
import { RawClient, mtlsCredentials } from './helpers/raw-grpc';
import { recordingLogger } from './helpers/recording-logger';
import { AGENT_ID, Stack } from './helpers/stack';

/** A Check that fails with a gRPC status instead of answering: the error. */
async function checkError(client: EnvoyAuthzClient, request: object, timeoutMs?: number): Promise<ServiceError> {
  try {
    const res = await client.check(request, timeoutMs);
    throw new Error(`expected a gRPC error, got a CheckResponse: ${JSON.stringify(res)}`);
  } catch (err) {
    if (!(err as ServiceError).code) throw err;
    return err as ServiceError;
  }
}

/** The broker's gateway_checks_total for `verdict`, from its /metrics. */
async function gatewayChecks(stack: Stack, verdict: string): Promise<number> {
  const text = await (await fetch(`${stack.adminUrl}/metrics`)).text();
  const line = text
    .split('\n')
    .find((l) => l.startsWith(`burrow_broker_gateway_checks_total{gateway="ext_authz",verdict="${verdict}"}`));
  return Number(line?.split(' ').pop() ?? Number.NaN);
}

/**
 * The broker as Envoy's external authorization service (issue 17), driven by an Envoy-shaped client
 * built from the vendored envoy.service.auth.v3 protos over real mTLS, against a real agent that
 * answers from examples/package-proxy (token verification, gateway mapping, Cedar with advice).
 */
describe('Envoy ext_authz on the broker', function () {
  this.timeout(30_000);
  let site: GatewaySite;
  let stack: Stack;
  let envoy: EnvoyAuthzClient;
  let token: string;
  const brokerLog = recordingLogger();
  const agentLog = recordingLogger();
  const pull = (name: string, extra: DownstreamRequest = {}): DownstreamRequest => ({
    method: 'GET',
    path: `/packages/npm/${name}`,
    headers: { 'x-package-age-days': '30' },
    token,
    agent: AGENT_ID,
    ...extra,
  });

  before(async () => {
    site = await GatewaySite.create();
    // The caller policy lets only Envoy's certificate ask for gateway decisions.
    const callers = path.join(site.dir, 'callers');
    mkdirSync(callers);
    writeFileSync(
      path.join(callers, 'gateways.cedar'),
      '@id("envoy-edge-checks")\n' +
        'permit (principal == Service::"envoy-edge", ' +
        'action == Action::"/burrow.policy.v1.PolicyDecisionService/Check", resource);\n',
    );
    stack = await Stack.start({
      broker: {
        extAuthzListen: '127.0.0.1:0',
        extAuthzAgentHeader: 'x-burrow-site',
        callerPolicy: { policiesDir: callers },
      },
      agent: site.agentConfig(),
      brokerLogger: brokerLog.logger,
      agentLogger: agentLog.logger,
    });
    envoy = new EnvoyAuthzClient(stack.extAuthzAddress, await stack.pki.issue('service', 'envoy-edge'));
    token = await site.token('alice');
  });
  after(async () => {
    envoy?.close();
    await stack?.stop();
    site?.cleanup();
  });

  it('allows a pull with the site headers, each replacing what the client sent', async () => {
    const allowedBefore = await gatewayChecks(stack, 'allow');
    const res = await envoy.check(envoyCheckRequest(pull('lodash', { headers: { 'x-package-age-days': '30' } })));
    expect(res.status?.code).to.equal(Status.OK);
    expect(res.http_response).to.equal('ok_response');
    const headers = headersOf(res.ok_response?.headers);
    expect(headers['x-burrow-subject']).to.include('alice');
    expect(headers['x-burrow-decision-id']).to.match(/\S{8,}/);
    expect(headers['x-burrow-advice'] ?? '').to.equal('');
    for (const option of res.ok_response?.headers ?? [])
      expect(option.append_action).to.equal('OVERWRITE_IF_EXISTS_OR_ADD');
    expect(await gatewayChecks(stack, 'allow')).to.equal(allowedBefore + 1);
  });

  it('logs one line per check at the broker, and the agent logs the same decision id; never the token', async () => {
    const res = await envoy.check(envoyCheckRequest(pull('lodash', { requestId: 'req-find-me' })));
    const decisionId = headersOf(res.ok_response?.headers)['x-burrow-decision-id'];
    const atBroker = brokerLog.records.filter((r) => r.message === 'gateway check' && r.requestId === 'req-find-me');
    expect(atBroker).to.have.length(1);
    expect(atBroker[0]).to.include({ gateway: 'ext_authz', agentId: AGENT_ID, verdict: 'allow', decisionId });
    expect(atBroker[0]!.durationMs).to.be.a('number');
    expect(agentLog.records.some((r) => JSON.stringify(r).includes(decisionId!))).to.equal(true);
    for (const records of [brokerLog.records, agentLog.records]) expect(JSON.stringify(records)).to.not.include(token);
  });

  it("carries the deciding policy's advice (quarantine) for a package younger than 7 days", async () => {
    const res = await envoy.check(envoyCheckRequest(pull('left-pad', { headers: { 'x-package-age-days': '2' } })));
    expect(res.http_response).to.equal('ok_response');
    expect(headersOf(res.ok_response?.headers)['x-burrow-advice']).to.equal('quarantine');
  });

  it('works the same from encode_raw_headers (header_map with raw values)', async () => {
    const res = await envoy.check(envoyCheckRequest(pull('lodash', { rawHeaders: true })));
    expect(res.http_response).to.equal('ok_response');
    expect(headersOf(res.ok_response?.headers)['x-burrow-subject']).to.include('alice');
  });

  it('denies a known-malicious package with 403, a short body and the decision id', async () => {
    const res = await envoy.check(envoyCheckRequest(pull('event-stream-4.0.0-flatmap')));
    expect(res.status?.code).to.equal(Status.PERMISSION_DENIED);
    expect(res.http_response).to.equal('denied_response');
    expect(res.denied_response?.status?.code).to.equal('Forbidden');
    const headers = headersOf(res.denied_response?.headers);
    expect(headers['x-burrow-decision-id']).to.match(/\S{8,}/);
    expect(res.denied_response?.body).to.equal(`access denied (decision ${headers['x-burrow-decision-id']})\n`);
    // The reasons stay at the site (its logs), not in what the client reads.
    expect(res.denied_response?.body).to.not.include('malicious');
  });

  it('answers 401 with an invalid_token challenge for an expired token', async () => {
    const expired = await site.token('alice', { expired: true });
    const res = await envoy.check(envoyCheckRequest(pull('lodash', { token: expired })));
    expect(res.status?.code).to.equal(Status.UNAUTHENTICATED);
    expect(res.denied_response?.status?.code).to.equal('Unauthorized');
    const challenge = headersOf(res.denied_response?.headers)['www-authenticate'];
    expect(challenge).to.equal('Bearer error="invalid_token", error_description="token expired"');
  });

  it('answers 401 with a bare Bearer challenge when the token is missing', async () => {
    const res = await envoy.check(envoyCheckRequest(pull('lodash', { token: undefined })));
    expect(res.denied_response?.status?.code).to.equal('Unauthorized');
    expect(headersOf(res.denied_response?.headers)['www-authenticate']).to.equal('Bearer');
  });

  it('takes the site from the operator header when the route has no context extension', async () => {
    const res = await envoy.check(
      envoyCheckRequest(
        pull('lodash', { agent: undefined, headers: { 'x-package-age-days': '30', 'x-burrow-site': AGENT_ID } }),
      ),
    );
    expect(res.http_response).to.equal('ok_response');
  });

  it('refuses a check that names no site with INVALID_ARGUMENT naming both ways to name one', async () => {
    const err = await checkError(envoy, envoyCheckRequest(pull('lodash', { agent: undefined })));
    expect(err.code).to.equal(Status.INVALID_ARGUMENT);
    expect(err.details).to.include('context_extensions.burrow_agent').and.include('x-burrow-site');
    const logged = brokerLog.records.filter((r) => r.message === 'gateway check' && r.code === 'INVALID_ARGUMENT');
    expect(logged.at(-1)).to.include({ gateway: 'ext_authz', verdict: 'error' });
    expect(String(logged.at(-1)!.details)).to.include('no site named');
  });

  it("refuses a gateway the broker's caller policy does not allow, before the site is asked", async () => {
    const outsider = new EnvoyAuthzClient(stack.extAuthzAddress, stack.serviceCert);
    try {
      const err = await checkError(outsider, envoyCheckRequest(pull('lodash')));
      expect(err.code).to.equal(Status.PERMISSION_DENIED);
      expect(err.details).to.include('platform-svc').and.include('PolicyDecisionService/Check');
    } finally {
      outsider.close();
    }
  });

  it('answers UNIMPLEMENTED for any other method on the listener', async () => {
    const raw = new RawClient(stack.extAuthzAddress, mtlsCredentials(stack.serviceCert), {
      'grpc.ssl_target_name_override': 'localhost',
    });
    try {
      const method = EXT_AUTHZ_CHECK_METHOD.replace(/Check$/, 'Report');
      const err = await raw.unary(method, Buffer.alloc(0)).then(
        () => undefined,
        (e: ServiceError) => e,
      );
      expect(err?.code).to.equal(Status.UNIMPLEMENTED);
      expect(err?.details).to.include(EXT_AUTHZ_CHECK_METHOD);
    } finally {
      raw.close();
    }
  });

  it("fails with UNAVAILABLE within Envoy's deadline when the site is offline", async () => {
    await stack.agent.stop();
    const startedMs = Date.now();
    const err = await checkError(envoy, envoyCheckRequest(pull('lodash')), 500);
    const tookMs = Date.now() - startedMs;
    expect(err.code, err.details).to.equal(Status.UNAVAILABLE);
    expect(err.details).to.include(`agent "${AGENT_ID}" is not connected`);
    expect(tookMs).to.be.below(500);
    expect(await gatewayChecks(stack, 'error')).to.be.at.least(1);
  });
});

describe('gateway listener flags', () => {
  let pki: PkiFixture;
  let base: Record<string, unknown>;
  before(async () => {
    pki = await PkiFixture.create();
    const b = await pki.issue('broker', 'broker-1');
    base = {
      ...serveDefaults(),
      'agent-listen': '127.0.0.1:0',
      'api-listen': '127.0.0.1:0',
      'tls-cert': b.cert,
      'tls-key': b.key,
      ca: b.ca,
    };
  });
  after(() => pki?.cleanup());

  it('are off by default, take HOST:PORT, durations and header names (lower-cased)', () => {
    const off = brokerConfigFromArgs(base);
    expect(off.extAuthzListen).to.equal(undefined);
    expect(off.forwardAuthListen).to.equal(undefined);
    expect([off.extAuthzTimeoutMs, off.forwardAuthTimeoutMs]).to.deep.equal([2_000, 2_000]);
    const on = brokerConfigFromArgs({
      ...base,
      'ext-authz-listen': '127.0.0.1:8447',
      'ext-authz-timeout': '750ms',
      'ext-authz-agent-header': 'X-Burrow-Site',
      'forward-auth-listen': '127.0.0.1:8448',
      'forward-auth-agent-header': 'X-Site',
    });
    expect(on.extAuthzListen).to.equal('127.0.0.1:8447');
    expect(on.extAuthzTimeoutMs).to.equal(750);
    expect(on.extAuthzAgentHeader).to.equal('x-burrow-site');
    expect(on.forwardAuthListen).to.equal('127.0.0.1:8448');
    expect(on.forwardAuthAgentHeader).to.equal('x-site');
  });

  it('refuse a header name that is not one, naming the flag', () => {
    expect(() => brokerConfigFromArgs({ ...base, 'forward-auth-agent-header': 'x site' })).to.throw(
      /forward-auth-agent-header: "x site" is not an HTTP header name/,
    );
    expect(() => brokerConfigFromArgs({ ...base, 'ext-authz-listen': 'nowhere' })).to.throw(/ext-authz-listen/);
  });
});

describe('the vendored Envoy protos and deploy/envoy/envoy.yaml', () => {
  const ROOT = path.resolve(__dirname, '..', '..');

  it("keep Envoy's field numbers for every field the broker reads or writes", () => {
    const root = new protobuf.Root();
    root.resolvePath = (_origin, target) => path.join(ROOT, 'proto', target);
    root.loadSync('envoy/service/auth/v3/external_auth.proto', { keepCase: true });
    // From envoyproxy/envoy api/ (v3): the numbers a real Envoy puts on the wire.
    const published: Record<string, Record<string, number>> = {
      'envoy.service.auth.v3.CheckRequest': { attributes: 1 },
      'envoy.service.auth.v3.AttributeContext': { source: 1, destination: 2, request: 4, context_extensions: 10 },
      'envoy.service.auth.v3.AttributeContext.Peer': { address: 1, principal: 4 },
      'envoy.service.auth.v3.AttributeContext.Request': { time: 1, http: 2 },
      'envoy.service.auth.v3.AttributeContext.HttpRequest': {
        id: 1,
        method: 2,
        headers: 3,
        path: 4,
        host: 5,
        scheme: 6,
        header_map: 13,
      },
      'envoy.service.auth.v3.CheckResponse': { status: 1, denied_response: 2, ok_response: 3, dynamic_metadata: 4 },
      'envoy.service.auth.v3.DeniedHttpResponse': { status: 1, headers: 2, body: 3 },
      'envoy.service.auth.v3.OkHttpResponse': { headers: 2, headers_to_remove: 5, response_headers_to_add: 6 },
      'envoy.config.core.v3.HeaderValue': { key: 1, value: 2, raw_value: 3 },
      'envoy.config.core.v3.HeaderValueOption': { header: 1, append: 2, append_action: 3, keep_empty_value: 4 },
      'envoy.config.core.v3.HeaderMap': { headers: 1 },
      'envoy.config.core.v3.Address': { socket_address: 1 },
      'envoy.config.core.v3.SocketAddress': { protocol: 1, address: 2, port_value: 3 },
      'envoy.type.v3.HttpStatus': { code: 1 },
      'google.rpc.Status': { code: 1, message: 2, details: 3 },
    };
    for (const [type, fields] of Object.entries(published)) {
      const t = root.lookupType(type);
      for (const [name, id] of Object.entries(fields)) expect(t.fields[name]?.id, `${type}.${name}`).to.equal(id);
    }
    const action = root.lookupEnum('envoy.config.core.v3.HeaderValueOption.HeaderAppendAction');
    expect(action.values.OVERWRITE_IF_EXISTS_OR_ADD).to.equal(2);
    const code = root.lookupEnum('envoy.type.v3.StatusCode');
    expect([code.values.Unauthorized, code.values.Forbidden]).to.deep.equal([401, 403]);
  });

  it('envoy.yaml routes to a site, fails closed with 503 and reaches the broker over mTLS and HTTP/2', () => {
    // biome-ignore lint/suspicious/noExplicitAny: Envoy's configuration tree, checked field by field
    const config: any = YAML.parse(readFileSync(path.join(ROOT, 'deploy', 'envoy', 'envoy.yaml'), 'utf8'));
    const hcm = config.static_resources.listeners[0].filter_chains[0].filters[0].typed_config;
    const route = hcm.route_config.virtual_hosts[0].routes[0];
    const perRoute = route.typed_per_filter_config['envoy.filters.http.ext_authz'];
    expect(perRoute['@type']).to.match(/ext_authz\.v3\.ExtAuthzPerRoute$/);
    expect(perRoute.check_settings.context_extensions.burrow_agent).to.be.a('string').and.not.equal('');
    const filter = hcm.http_filters.find((f: { name: string }) => f.name === 'envoy.filters.http.ext_authz');
    const authz = filter.typed_config;
    expect(authz['@type']).to.match(/ext_authz\.v3\.ExtAuthz$/);
    expect(authz.transport_api_version).to.equal('V3');
    expect(authz.failure_mode_allow).to.equal(false);
    expect(authz.status_on_error.code).to.equal('ServiceUnavailable');
    const clusterName = authz.grpc_service.envoy_grpc.cluster_name;
    const broker = config.static_resources.clusters.find((c: { name: string }) => c.name === clusterName);
    const h2 = broker.typed_extension_protocol_options['envoy.extensions.upstreams.http.v3.HttpProtocolOptions'];
    expect(h2.explicit_http_config).to.have.property('http2_protocol_options');
    const tls = broker.transport_socket.typed_config;
    expect(tls['@type']).to.match(/UpstreamTlsContext$/);
    expect(tls.common_tls_context.tls_certificates[0].certificate_chain.filename).to.be.a('string');
    expect(tls.common_tls_context.tls_certificates[0].private_key.filename).to.be.a('string');
    expect(tls.common_tls_context.validation_context.trusted_ca.filename).to.be.a('string');
    expect(tls.common_tls_context.alpn_protocols).to.deep.equal(['h2']);
    // Envoy's check deadline is below the broker's default --ext-authz-timeout, so Envoy's applies.
    expect(Number.parseFloat(authz.grpc_service.timeout)).to.be.below(2);
  });
});

describe('Envoy ext_authz: a site that tries to rewrite the request', function () {
  this.timeout(30_000);
  let stack: Stack;
  let envoy: EnvoyAuthzClient;
  let rogue: http2.Http2Server;

  before(async () => {
    // The site's Check answered by an upstream of the agent's (an --upstream route replaces the
    // built-in), standing for a rogue or misconfigured agent: headers no site may set, and values
    // and a decision id that would end a header line.
    rogue = http2.createServer();
    rogue.on('stream', (stream) => {
      void answerUnary(
        stream,
        async () =>
          API_CODECS.checkResponse.encode({
            verdict: 'ALLOW',
            decision_id: 'id\r\nx-injected: 1',
            headers: {
              authorization: 'Bearer stolen',
              host: 'elsewhere.example',
              'x-burrow-groups': 'admins',
              'x-burrow-note': 'a\r\nset-cookie: session=1',
            },
          }),
        { method: POLICY_METHODS.check, maxMessageBytes: 64 * 1024, deadlineMs: Date.now() + 10_000, callId: 'r1' },
      );
    });
    await new Promise<void>((resolve) => rogue.listen(0, '127.0.0.1', resolve));
    const { port } = rogue.address() as { port: number };
    stack = await Stack.start({
      broker: { extAuthzListen: '127.0.0.1:0' },
      agent: { upstreams: [{ service: 'burrow.policy.v1.PolicyDecisionService', address: `127.0.0.1:${port}` }] },
    });
    envoy = new EnvoyAuthzClient(stack.extAuthzAddress, await stack.pki.issue('service', 'envoy-edge'));
  });
  after(async () => {
    envoy?.close();
    await stack?.stop();
    await new Promise<void>((resolve) => rogue?.close(() => resolve()));
  });

  it('passes only printable x-burrow-* headers to the gateway, and no decision id that is not one', async () => {
    const res = await envoy.check(
      envoyCheckRequest({ method: 'GET', path: '/packages/npm/lodash', token: 'x', agent: AGENT_ID }),
    );
    expect(res.status?.code).to.equal(Status.OK);
    expect(headersOf(res.ok_response?.headers)).to.deep.equal({ 'x-burrow-groups': 'admins' });
  });
});
