#!/usr/bin/env python3
"""An app backend built on wechatpy (unmodified, from PyPI) against miniapp-brokerd's backend HTTP API.

The backend code is what it would be against WeChat; only where the library connects changes.
wechatpy has no single base-URL setting: each API group carries ``API_BASE_URL`` (the client's for
``/cgi-bin/...``, ``client.wxa``'s for ``/sns/...`` and ``/wxa/...``), and
``WeChatClient.fetch_access_token`` names ``https://api.weixin.qq.com/cgi-bin/token`` literally, so
a small subclass points that one method at the same base (calling the library's own
``_fetch_access_token``). Nothing else is overridden:

* the access token is fetched and managed by the library (``/cgi-bin/token``);
* ``client.wxa.code_to_session`` swaps a wx.login code for openid and session_key
  (``/sns/jscode2session``; the library adds its access token to the query, which is ignored);
* the phone code is redeemed with ``/wxa/business/getuserphonenumber`` and the session checked with
  ``/wxa/checksession`` through the library's generic request methods (wechatpy 1.8 has no helpers
  for them), which add the managed access token;
* a reused code and a wrong signature surface as wechatpy's ``WeChatClientException`` with
  WeChat's errcodes 40163 and 87009.

Each step prints one ``ok ...`` line; the last is ``wechatpy backend: all ok``. A failure prints
``FAIL ...`` on stderr and exits 1.

Usage: backend_wechatpy.py --base-url=http://127.0.0.1:PORT --appid=ID --secret=S
                           --login-code=C --phone-code=C
(the ``--flag=value`` form, since secrets and codes may start with '-')
"""

import argparse
import hashlib
import hmac
import sys

from wechatpy import WeChatClient
from wechatpy.exceptions import WeChatClientException


def fail(message):
    print(f"FAIL {message}", file=sys.stderr)
    sys.exit(1)


def client_for(base_url, appid, secret):
    """A WeChatClient whose requests go to base_url instead of https://api.weixin.qq.com."""
    base = base_url.rstrip("/")

    class BrokerWeChatClient(WeChatClient):
        API_BASE_URL = f"{base}/cgi-bin/"

        def fetch_access_token(self):
            return self._fetch_access_token(
                url=f"{base}/cgi-bin/token",
                params={"grant_type": "client_credential", "appid": self.appid, "secret": self.secret},
            )

    client = BrokerWeChatClient(appid, secret, timeout=10)
    client.wxa.API_BASE_URL = f"{base}/"
    return client


def expect_errcode(what, errcode, call):
    try:
        result = call()
    except WeChatClientException as e:
        if int(e.errcode) != errcode:
            fail(f"{what}: errcode {e.errcode} ({e.errmsg}), expected {errcode}")
        return
    fail(f"{what}: succeeded ({result}), expected errcode {errcode}")


def main():
    parser = argparse.ArgumentParser()
    for flag in ("--base-url", "--appid", "--secret", "--login-code", "--phone-code"):
        parser.add_argument(flag, required=True)
    args = parser.parse_args()
    client = client_for(args.base_url, args.appid, args.secret)

    token = client.access_token
    if not token or client.expires_at is None:
        fail("no access token")
    print("ok access token fetched and managed by wechatpy")

    session = client.wxa.code_to_session(args.login_code)
    if not session.get("openid", "").startswith("o") or not session.get("session_key"):
        fail(f"code_to_session answered {session}")
    print("ok code_to_session returned openid and session_key")

    phone = client.wxa._post("wxa/business/getuserphonenumber", data={"code": args.phone_code})
    info = phone.get("phone_info", {})
    if info.get("watermark", {}).get("appid") != args.appid or not info.get("purePhoneNumber"):
        fail(f"getuserphonenumber answered {phone}")
    print(f"ok getuserphonenumber purePhoneNumber={info['purePhoneNumber']} countryCode={info['countryCode']}")

    signature = hmac.new(session["session_key"].encode(), b"", hashlib.sha256).hexdigest()
    check = client.wxa._get(
        "wxa/checksession",
        params={"openid": session["openid"], "signature": signature, "sig_method": "hmac_sha256"},
    )
    if check.get("errcode") != 0:
        fail(f"checksession answered {check}")
    print("ok checksession accepted the session's signature")

    expect_errcode("a reused login code", 40163, lambda: client.wxa.code_to_session(args.login_code))
    print("ok a reused login code is refused with 40163")
    wrong = hmac.new(b"not-the-session-key", b"", hashlib.sha256).hexdigest()
    expect_errcode(
        "a wrong signature",
        87009,
        lambda: client.wxa._get(
            "wxa/checksession",
            params={"openid": session["openid"], "signature": wrong, "sig_method": "hmac_sha256"},
        ),
    )
    print("ok a wrong checksession signature is refused with 87009")
    print("wechatpy backend: all ok")


if __name__ == "__main__":
    main()
