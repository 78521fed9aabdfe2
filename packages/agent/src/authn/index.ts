/** Token verification for the agent's built-in burrow.auth.v1.AuthenticationService. */
export * from './authn-config';
export * from './authn-metrics';
export * from './http-client';
export * from './introspection-client';
export * from './jose-loader';
export * from './jwks-key-set';
export * from './jwks-source';
export * from './jwks-file-loader';
export * from './jwks-url-loader';
export * from './token-algorithms';
export * from './token-refusal';
export * from './token-verifier';
