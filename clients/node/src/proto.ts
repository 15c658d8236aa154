/**
 * The wire contract, loaded from the package's copy of `proto/` when the module is first imported.
 *
 * The messages are loaded (protobufjs, through @grpc/proto-loader) rather than compiled to code:
 * the `.proto` files stay the single contract, no protoc binary is needed anywhere, and the
 * TypeScript types in `./generated` are produced from the same files at build time.
 */
import * as path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import type { ProtoGrpcType as AdminProto } from './generated/admin';
import type { ProtoGrpcType as ExchangeProto } from './generated/exchange';
import type { ProtoGrpcType as HostProto } from './generated/host';
import type { ProtoGrpcType as RendererProto } from './generated/renderer';

/** Where the `.proto` files are: the package's own copy (made by `npm run build`). */
export const PROTO_DIR = path.resolve(__dirname, '..', '..', 'proto');

const FILES = ['api', 'renderer', 'host', 'admin', 'exchange'].map((f) => `miniapp/broker/v1/${f}.proto`);

/** Must match the flags scripts/build.js gives proto-loader-gen-types. */
const LOADER_OPTIONS: protoLoader.Options = {
  keepCase: false,
  longs: Number,
  enums: String,
  defaults: true,
  oneofs: true,
  includeDirs: [PROTO_DIR],
};

type Root = AdminProto & ExchangeProto & HostProto & RendererProto;

/** The loaded descriptors, by full name (the JSON bridge's mapping reads the message fields). */
export const definition = protoLoader.loadSync(FILES, LOADER_OPTIONS);
/** The `miniapp.broker.v1` package: service client constructors and message types. */
export const v1 = (grpc.loadPackageDefinition(definition) as unknown as Root).miniapp.broker.v1;
