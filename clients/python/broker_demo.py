#!/usr/bin/env python3
"""A Python host and a Python renderer talking to miniapp-brokerd, built only from proto/.

This proves the wire contract is usable from another language with stock grpcio:

* the host connects to Host.Connect over ``unix:<socket>`` with ``authorization: Bearer <token>``,
  sends Hello (it implements LOGIN) with a signed-in user, and answers the v1 login delegate call;
* it launches two app instances with Host.LaunchApp: one whose app.json says ``"apiVersion":"v1"``
  and one that says ``"v2"``;
* the renderer, on its own channel with only the ``x-launch-token`` metadata, calls OpenApi.Login
  for the v1 app (delegated: it must get the host's code back), sends three logins on an
  OpenApi.Session stream whose request iterator then ends (grpcio half-closes it) and must still
  get all three answers, and calls OpenApi.Invoke with the JSON bridge for the v2 app (answered
  by the daemon itself);
* the app's backend registers a secret with Admin.RegisterApp and swaps the v2 code for an openid
  with Exchange.Code2Session.

Before the host token or a launch token goes out, the script checks that the server at the socket
runs as this user (SO_PEERCRED on Linux, the socket file's owner elsewhere), as the Rust client and
the CLI do: a squatter of another uid on the daemon's address is refused with the Rust client's
words and gets nothing.

Stubs are generated from proto/ at run time into a temporary directory (never committed).
Each step prints one ``ok ...`` line; the last line is ``python client: all ok``. Any failure prints
``FAIL ...`` on stderr and exits 1. Every RPC is bounded by a deadline.

Usage: broker_demo.py --socket PATH --token-file PATH [--proto-dir DIR]
"""

import argparse
import importlib
import json
import os
import queue
import secrets
import socket
import struct
import sys
import tempfile
import threading

import grpc
from grpc_tools import protoc

DEADLINE_S = 10.0
# grpc-core sends the socket path, percent-encoded, as the HTTP/2 :authority of a `unix:` target;
# the daemon's HTTP/2 stack (h2) refuses that as a malformed authority. Any plain host name works.
CHANNEL_OPTIONS = [("grpc.default_authority", "localhost")]
PROTO_FILES = ["api.proto", "renderer.proto", "host.proto", "exchange.proto", "admin.proto"]


class Failure(Exception):
    pass


class ForeignServer(Failure):
    """The server at an address runs as another user than this process: nothing was sent to it."""

    def __init__(self, address, server_uid, own_uid):
        super().__init__(
            f"the server at {address} runs as uid {server_uid}, not as this user (uid {own_uid}); "
            "refusing to send it anything"
        )


def check_server_owner(path):
    """Raises ForeignServer unless the server listening at the Unix socket `path` runs as this
    process's effective uid. grpcio opens its own connections, so this asks on one of ours, which
    sends nothing: SO_PEERCRED (Linux) gives the listening process's uid; elsewhere the socket
    file's owner, the uid of whoever bound it, stands in for it. A squatter would have to replace
    the socket between this check and grpcio's connect, which needs write access to the daemon's
    private socket directory."""
    own = os.geteuid()
    peercred = getattr(socket, "SO_PEERCRED", None)
    if peercred is not None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(DEADLINE_S)
            probe.connect(path)
            _pid, uid, _gid = struct.unpack("iII", probe.getsockopt(socket.SOL_SOCKET, peercred, struct.calcsize("iII")))
    else:
        uid = os.stat(path).st_uid
    if uid != own:
        raise ForeignServer(path, uid, own)


def check(cond, what):
    if not cond:
        raise Failure(what)


def generate_stubs(proto_dir, out_dir):
    """Runs protoc (from grpcio-tools) over proto/miniapp/broker/v1/*.proto into out_dir."""
    include = os.path.join(protoc.__file__.rsplit(os.sep, 1)[0], "_proto")
    files = [os.path.join(proto_dir, "miniapp", "broker", "v1", f) for f in PROTO_FILES]
    args = ["protoc", f"-I{proto_dir}", f"-I{include}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}", *files]
    if protoc.main(args) != 0:
        raise Failure(f"protoc failed on {proto_dir}")
    sys.path.insert(0, out_dir)
    modules = {}
    for name in ("api", "renderer", "host", "exchange", "admin"):
        modules[name] = importlib.import_module(f"miniapp.broker.v1.{name}_pb2")
        modules[name + "_grpc"] = importlib.import_module(f"miniapp.broker.v1.{name}_pb2_grpc")
    return modules


class PythonHost:
    """The host link: Hello, then one DelegateResult per DelegateCall, on a background thread."""

    def __init__(self, m, channel, token):
        self.m = m
        self.metadata = (("authorization", f"Bearer {token}"),)
        self.host = m["host_grpc"].HostStub(channel)
        self.outbox = queue.Queue()
        self.welcome = queue.Queue()
        self.calls = []  # (api arm, app_id, api_version, code answered)
        self.lock = threading.Lock()
        self.replies = None

    def connect(self, uid):
        h = self.m["host"]
        hello = h.Hello(
            methods=[h.LOGIN],
            host_name="python-host",
            user=h.SignedInUser(uid=uid, profile=h.UserProfile(nick_name="Py User")),
        )
        self.outbox.put(h.HostMessage(hello=hello))
        self.replies = self.host.Connect(iter(self.outbox.get, None), metadata=self.metadata)
        threading.Thread(target=self._serve, daemon=True).start()
        try:
            message = self.welcome.get(timeout=DEADLINE_S)
        except queue.Empty:
            raise Failure("no Welcome from the daemon")
        if isinstance(message, Exception):
            raise Failure(f"Host.Connect refused: {message.code()} {message.details()}")
        return message

    def _serve(self):
        h, api = self.m["host"], self.m["api"]
        try:
            for message in self.replies:
                kind = message.WhichOneof("msg")
                if kind == "welcome":
                    self.welcome.put(message.welcome)
                elif kind == "call":
                    call = message.call
                    arm = call.api.WhichOneof("api") if call.WhichOneof("request") == "api" else call.WhichOneof("request")
                    if arm == "login":
                        code = "py-host-" + secrets.token_hex(8)
                        # err_msg left empty on purpose: the daemon fills in "login:ok".
                        result = h.DelegateResult(call_id=call.call_id, api=api.ApiResponse(login=api.LoginResponse(code=code)))
                    else:
                        code = None
                        result = h.DelegateResult(
                            call_id=call.call_id,
                            error=api.HostError(domain="PythonHostDomain", code=-1, message=f"{arm} not handled"),
                        )
                    with self.lock:
                        self.calls.append((arm, call.app.app_id, call.app.api_version, code))
                    self.outbox.put(h.HostMessage(result=result))
        except grpc.RpcError as e:
            self.welcome.put(e)

    def launch(self, app_id, app_json):
        request = self.m["host"].LaunchAppRequest(app_id=app_id, app_json=app_json)
        return self.host.LaunchApp(request, metadata=self.metadata, timeout=DEADLINE_S)

    def close(self):
        self.outbox.put(None)
        if self.replies is not None:
            self.replies.cancel()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--socket", required=True, help="the daemon's Unix socket path")
    parser.add_argument("--token-file", required=True, help="the daemon's host token file")
    default_proto = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "proto"))
    parser.add_argument("--proto-dir", default=default_proto)
    args = parser.parse_args()

    with open(args.token_file, encoding="utf-8") as f:
        token = f.read().strip()
    target = f"unix:{args.socket}"
    check_server_owner(args.socket)
    print(f"ok the server at {args.socket} runs as this user (uid {os.geteuid()})")

    with tempfile.TemporaryDirectory(prefix="miniapp-broker-py-") as out_dir:
        m = generate_stubs(args.proto_dir, out_dir)
        print(f"ok stubs generated from {args.proto_dir} with grpcio {grpc.__version__}")

        host_channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        renderer_channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        host = PythonHost(m, host_channel, token)
        try:
            run(m, host, host_channel, renderer_channel, token)
        finally:
            host.close()
            renderer_channel.close()
            host_channel.close()
    print("python client: all ok")


def run(m, host, host_channel, renderer_channel, token):
    admin_md = (("authorization", f"Bearer {token}"),)
    admin = m["admin_grpc"].AdminStub(host_channel)

    welcome = host.connect(uid="py-user-1")
    check(welcome.default_api_version in ("v1", "v2", "v3"), f"Welcome names a version: {welcome}")
    # The daemon publishes the host right after Welcome; wait until Admin.Status says so.
    for _ in range(200):
        status = admin.Status(m["admin"].StatusRequest(), metadata=admin_md, timeout=DEADLINE_S)
        if status.host_connected:
            break
        threading.Event().wait(0.01)
    check(status.host_connected and status.host_name == "python-host", f"status shows the python host: {status}")
    print(f"ok host connected (daemon {welcome.daemon_version}, host_connected={status.host_connected})")

    v1_app = host.launch("wxpython00000001", json.dumps({"apiVersion": "v1"}))
    check(v1_app.api_version == "v1" and v1_app.version_source == "app.json", f"v1 launch: {v1_app}")
    print(f"ok launched wxpython00000001 as {v1_app.api_version} ({v1_app.version_source})")

    renderer = m["renderer_grpc"].OpenApiStub(renderer_channel)
    api = m["api"]

    # v1: the daemon delegates login to this host; the renderer gets the host's code.
    login = renderer.Login(api.LoginRequest(), metadata=(("x-launch-token", v1_app.launch_token),), timeout=DEADLINE_S)
    with host.lock:
        calls = list(host.calls)
    check(len(calls) == 1 and calls[0][0] == "login", f"the host saw one login call: {calls}")
    check(calls[0][1] == "wxpython00000001" and calls[0][2] == "v1", f"delegate call names the app and v1: {calls}")
    check(login.err_msg == "login:ok", f"v1 login errMsg: {login.err_msg!r}")
    check(login.code == calls[0][3], f"v1 login code {login.code!r} is the host's {calls[0][3]!r}")
    print(f"ok v1 login errMsg={login.err_msg} code=host's")

    # A stock grpcio stream whose request iterator ends: grpcio half-closes the stream after the
    # last call, and every answer still comes.
    token_md = (("x-launch-token", v1_app.launch_token),)
    calls = [m["renderer"].RendererCall(id=i, request=api.ApiRequest(login=api.LoginRequest())) for i in (1, 2, 3)]
    replies = list(renderer.Session(iter(calls), metadata=token_md, timeout=DEADLINE_S))
    with host.lock:
        check(len(host.calls) == 4, f"the host answered the three streamed logins: {host.calls}")
    answered = sorted(r.id for r in replies if r.WhichOneof("outcome") == "ok" and r.ok.login.err_msg == "login:ok")
    check(answered == [1, 2, 3], f"every call of the half-closed stream answered: {replies}")
    print(f"ok v1 session stream half-closed by grpcio got {len(answered)} answers")

    # A wrong launch token is refused.
    try:
        renderer.Login(api.LoginRequest(), metadata=(("x-launch-token", "not-a-token"),), timeout=DEADLINE_S)
        raise Failure("a bogus launch token was accepted")
    except grpc.RpcError as e:
        check(e.code() == grpc.StatusCode.UNAUTHENTICATED, f"bogus token refused with UNAUTHENTICATED, got {e.code()}")
    print("ok bogus launch token refused UNAUTHENTICATED")

    # v2: the daemon answers login itself; the JSON bridge returns the WeChat-shaped object.
    v2_app = host.launch("wxpython00000002", json.dumps({"apiVersion": "v2"}))
    check(v2_app.api_version == "v2", f"v2 launch: {v2_app}")
    invoked = renderer.Invoke(
        m["renderer"].InvokeRequest(api="login", params_json="{}"),
        metadata=(("x-launch-token", v2_app.launch_token),),
        timeout=DEADLINE_S,
    )
    result = json.loads(invoked.result_json)
    check(invoked.ok and result.get("errMsg") == "login:ok" and result.get("code"), f"v2 Invoke login: {invoked}")
    with host.lock:
        check(len(host.calls) == 4, f"v2 login did not reach the host: {host.calls}")
    print(f"ok v2 invoke login errMsg={result['errMsg']}")

    # The app's backend: register a secret, then swap the code for an openid.
    reg = admin.RegisterApp(m["admin"].RegisterAppRequest(app_id="wxpython00000002"), metadata=admin_md, timeout=DEADLINE_S)
    check(reg.created and reg.secret, f"RegisterApp created a secret: created={reg.created}")
    exchange = m["exchange_grpc"].ExchangeStub(renderer_channel)
    session = exchange.Code2Session(
        m["exchange"].Code2SessionRequest(app_id="wxpython00000002", secret=reg.secret, code=result["code"]),
        timeout=DEADLINE_S,
    )
    check(session.openid and session.session_key, "Code2Session returned an openid and a session key")
    print("ok exchange code2Session returned an openid")


if __name__ == "__main__":
    try:
        main()
    except Failure as e:
        print(f"FAIL {e}", file=sys.stderr)
        sys.exit(1)
    except grpc.RpcError as e:
        print(f"FAIL rpc {e.code()}: {e.details()}", file=sys.stderr)
        sys.exit(1)
