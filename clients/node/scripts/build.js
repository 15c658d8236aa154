#!/usr/bin/env node
// Builds the package from the repository's own files, offline:
//  1. copies ../../proto (the wire contract) into ./proto, which the package loads at run time;
//  2. generates TypeScript types for every message and service from it (proto-loader-gen-types,
//     shipped with @grpc/proto-loader) into src/generated, so types never drift from proto/;
//  3. compiles src/ and test/ with tsc into dist/.
// Outside the repository (an installed package) ./proto is already there and step 1 is skipped.
'use strict';
const { execFileSync } = require('node:child_process');
const fs = require('node:fs');
const path = require('node:path');

const root = path.resolve(__dirname, '..');
const repoProto = path.resolve(root, '..', '..', 'proto');
const proto = path.join(root, 'proto');
const files = ['api', 'renderer', 'host', 'admin', 'exchange'].map((f) => `miniapp/broker/v1/${f}.proto`);

if (fs.existsSync(path.join(repoProto, files[0]))) {
  fs.rmSync(proto, { recursive: true, force: true });
  fs.cpSync(repoProto, proto, { recursive: true, filter: (src) => fs.statSync(src).isDirectory() || src.endsWith('.proto') });
}

const bin = (pkg, file) => path.join(path.dirname(require.resolve(`${pkg}/package.json`, { paths: [root] })), file);
const generated = path.join(root, 'src', 'generated');
fs.rmSync(generated, { recursive: true, force: true });
// These options must match LOADER_OPTIONS in src/proto.ts.
execFileSync(process.execPath, [
  bin('@grpc/proto-loader', 'build/bin/proto-loader-gen-types.js'),
  '--longs=Number', '--enums=String', '--defaults', '--oneofs', '--includeComments',
  '--grpcLib=@grpc/grpc-js', '-I', proto, '-O', generated, ...files,
], { stdio: 'inherit' });

fs.rmSync(path.join(root, 'dist'), { recursive: true, force: true });
try {
  execFileSync(process.execPath, [bin('typescript', 'bin/tsc'), '-p', root], { stdio: 'inherit' });
} catch {
  console.error('build: tsc failed');
  process.exit(1);
}
