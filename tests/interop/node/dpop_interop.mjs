// DPoP (RFC 9449) interop for tokend's integration tests with panva's
// JavaScript implementations (driven by tests/it/dpop_node.rs): `dpop`
// (proofs for JavaScript runtimes) makes proofs, `jose` verifies tokend's.
// Keys go through WebCrypto, as in a browser or an edge runtime.
//
// check PROOF TOKEN METHOD URI
//     Verifies a proof tokend made: jose's jwtVerify with EmbeddedJWK (the
//     ES256 signature under the header's public jwk, typ dpop+jwt), then
//     htm, htu, iat, jti, ath, no private key in the jwk, and that jose's
//     calculateJwkThumbprint of the jwk is the token's cnf.jkt. Prints it.
// make KEY_PEM TOKEN METHOD URI [NONCE]
//     Makes a proof with dpop's generateProof for TOKEN (and the verifier's
//     NONCE, if given), signed by the P-256 PKCS#8 key in KEY_PEM imported
//     into WebCrypto. Prints it.
//
// Exits 1 with the reason on any failed check.

import { createPublicKey } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { webcrypto } from 'node:crypto';

import { generateProof } from 'dpop';
import { EmbeddedJWK, calculateJwkThumbprint, decodeJwt, jwtVerify } from 'jose';

const subtle = webcrypto.subtle;

function fail(why) {
  console.error(`dpop_interop: ${why}`);
  process.exit(1);
}

function expect(cond, why) {
  if (!cond) fail(why);
}

async function sha256b64u(text) {
  const digest = await subtle.digest('SHA-256', new TextEncoder().encode(text));
  return Buffer.from(digest).toString('base64url');
}

async function check(proof, token, method, uri) {
  const { payload, protectedHeader } = await jwtVerify(proof, EmbeddedJWK, {
    typ: 'dpop+jwt',
    algorithms: ['ES256'],
  });
  const jwk = protectedHeader.jwk;
  expect(jwk && jwk.d === undefined, 'a private key in the proof jwk');
  expect(payload.htm === method, `htm ${payload.htm} is not ${method}`);
  const htu = uri.split('#')[0].split('?')[0];
  expect(payload.htu === htu, `htu ${payload.htu} is not ${htu}`);
  expect(Math.abs(payload.iat - Date.now() / 1000) < 300, `iat ${payload.iat} is not now`);
  expect(
    typeof payload.jti === 'string' && Buffer.from(payload.jti, 'base64url').length >= 12,
    `jti ${payload.jti} carries under 96 bits`,
  );
  expect(payload.ath === (await sha256b64u(token)), 'ath is not the hash of the token');
  const jkt = await calculateJwkThumbprint(jwk, 'sha256');
  const cnf = decodeJwt(token).cnf;
  expect(cnf && cnf.jkt === jkt, `cnf.jkt ${cnf && cnf.jkt} is not the proof key's ${jkt}`);
  console.log(jkt);
}

async function make(keyPem, token, method, uri, nonce) {
  const pem = readFileSync(keyPem, 'utf8');
  const der = Buffer.from(
    pem.replace(/-----(BEGIN|END) PRIVATE KEY-----/g, '').replace(/\s+/g, ''),
    'base64',
  );
  const algorithm = { name: 'ECDSA', namedCurve: 'P-256' };
  const privateKey = await subtle.importKey('pkcs8', der, algorithm, false, ['sign']);
  const publicJwk = createPublicKey(pem).export({ format: 'jwk' });
  const publicKey = await subtle.importKey('jwk', publicJwk, algorithm, true, ['verify']);
  const proof = await generateProof({ privateKey, publicKey }, uri, method, nonce, token);
  console.log(proof);
}

const [command, ...args] = process.argv.slice(2);
try {
  if (command === 'check') await check(...args);
  else if (command === 'make') await make(...args);
  else fail(`unknown command ${command}: check or make`);
} catch (e) {
  fail(`${e.name}: ${e.message}`);
}
