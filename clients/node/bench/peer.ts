/**
 * The benchmark's other Node process (started with `child_process.fork`), in one of two roles, so
 * that the far end of every measured hop runs on an event loop of its own:
 *
 * - `host SOCKET TOKEN_FILE`: a `HostClient` whose `login` handler answers at once, and which
 *   launches app instances when the bench asks (the launch tokens go back over IPC);
 * - `echo SOCKET`: a grpc-js server of `Echo` (bench/echo.proto) on a Unix socket.
 *
 * It tells the parent `{ type: 'ready' }`, then serves until the parent disconnects.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import { HostClient } from '../src/index';

/** What the parent sends. */
export type ToPeer = { type: 'launch'; count: number; appJson: string; appsOf: number };
/** What a peer sends back. */
export type FromPeer = { type: 'ready' } | { type: 'launched'; tokens: string[] } | { type: 'error'; message: string };

/** The echo service's definition, shared with the bench's clients. */
export function echoService(): grpc.GrpcObject {
  const file = path.resolve(__dirname, '..', '..', 'bench', 'echo.proto');
  const definition = protoLoader.loadSync(file, { keepCase: false, longs: Number, defaults: true });
  return grpc.loadPackageDefinition(definition);
}

function send(message: FromPeer): void {
  process.send?.(message);
}

async function host(socket: string, tokenFile: string): Promise<void> {
  const client = await HostClient.connect({
    address: socket,
    tokenFile,
    name: 'node-bench-host',
    user: { uid: 'bench-user', profile: { nickName: 'Bench' } },
    reconnect: false,
    handlers: { login: () => ({ code: 'bench-code' }) },
  });
  process.on('message', (message: ToPeer) => {
    if (message.type !== 'launch') return;
    void (async () => {
      const tokens: string[] = [];
      for (let i = 0; i < message.count; i++) {
        // Instances spread over `appsOf` apps, as a shell with several mini apps open.
        const app = `wxbench${String(i % message.appsOf).padStart(10, '0')}`;
        tokens.push((await client.launchApp(app, message.appJson)).launchToken);
      }
      send({ type: 'launched', tokens });
    })().catch((e: unknown) => send({ type: 'error', message: String(e) }));
  });
  process.on('disconnect', () => {
    client.close();
    process.exit(0);
  });
  send({ type: 'ready' });
}

async function echo(socket: string): Promise<void> {
  const pkg = echoService() as unknown as { miniapp: { bench: { v1: { Echo: grpc.ServiceClientConstructor } } } };
  const server = new grpc.Server();
  server.addService(pkg.miniapp.bench.v1.Echo.service, {
    Unary: (call: grpc.ServerUnaryCall<unknown, unknown>, callback: grpc.sendUnaryData<unknown>) => callback(null, call.request),
    Stream: (call: grpc.ServerDuplexStream<unknown, unknown>) => {
      call.on('data', (ping: unknown) => call.write(ping));
      call.on('end', () => call.end());
      call.on('error', () => {});
    },
  });
  fs.rmSync(socket, { force: true });
  await new Promise<void>((resolve, reject) =>
    server.bindAsync(`unix:${socket}`, grpc.ServerCredentials.createInsecure(), (e) => (e ? reject(e) : resolve())),
  );
  process.on('disconnect', () => {
    server.forceShutdown();
    process.exit(0);
  });
  send({ type: 'ready' });
}

if (require.main === module) {
  const [role, ...args] = process.argv.slice(2);
  const run = role === 'host' ? host(args[0], args[1]) : role === 'echo' ? echo(args[0]) : Promise.reject(new Error(`unknown role ${role}`));
  run.catch((e: unknown) => {
    send({ type: 'error', message: e instanceof Error ? e.message : String(e) });
    process.exit(1);
  });
}
