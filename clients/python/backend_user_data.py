#!/usr/bin/env python3
"""A wechatpy backend (unmodified, from PyPI) verifying what wx.getUserInfo / wx.getUserProfile
answered through miniapp-brokerd, as it verifies WeChat's answers.

The backend redeems the login codes with ``client.wxa.code_to_session`` (``/sns/jscode2session``),
checks each answer's ``signature`` over ``rawData`` with wechatpy's ``check_wxa_signature`` and
decrypts ``encryptedData`` with ``WeChatWxaCrypto(session_key, iv, appid).decrypt_message`` (which
also refuses a watermark of another app). Then it plays the most common backend failure: a key
that a later login replaced (``--stale-key``, redeemed by the test before those logins) fails
checksession (87009), the signature check and the decryption, while the current key works.

Input (a JSON object on stdin): ``base_url``, ``appid``, ``secret``, ``codes`` (login codes, the
earliest first: each must redeem to the session's current key), ``stale_key``, ``answers``
(``{"surface", "rawData", "signature", "encryptedData", "iv"}``, made after the last login), and
``before`` (one answer made while ``stale_key`` was current). Each step prints one ``ok ...``
line; the last is ``wechatpy user data: all ok``. A failure prints ``FAIL ...`` on stderr, exit 1.
"""

import hashlib
import hmac
import json
import sys

from wechatpy.crypto import WeChatWxaCrypto
from wechatpy.exceptions import InvalidAppIdException, InvalidSignatureException
from wechatpy.utils import check_wxa_signature

from backend_wechatpy import client_for, expect_errcode, fail


def checksession(client, openid, key):
    signature = hmac.new(key.encode(), b"", hashlib.sha256).hexdigest()
    return client.wxa._get(
        "wxa/checksession", params={"openid": openid, "signature": signature, "sig_method": "hmac_sha256"}
    )


def verify(answer, key, appid, session):
    """The answer's signature and encrypted data hold with `key`: the decrypted user data."""
    check_wxa_signature(key, answer["rawData"], answer["signature"])
    data = WeChatWxaCrypto(key, answer["iv"], appid).decrypt_message(answer["encryptedData"])
    if data.get("openId") != session["openid"]:
        fail(f"{answer['surface']}: openId {data.get('openId')!r} is not the session's {session['openid']!r}")
    if data.get("unionId") != session.get("unionid"):
        fail(f"{answer['surface']}: unionId {data.get('unionId')!r} is not the session's")
    if data["watermark"]["appid"] != appid or not isinstance(data["watermark"]["timestamp"], int):
        fail(f"{answer['surface']}: watermark {data['watermark']}")
    raw = json.loads(answer["rawData"])
    for field, value in raw.items():
        if data.get(field) != value:
            fail(f"{answer['surface']}: the decrypted {field} differs from rawData's")
    return data


def refused_with(what, key, answer, appid):
    """`key` fails both the signature check and the decryption of `answer`."""
    try:
        check_wxa_signature(key, answer["rawData"], answer["signature"])
        fail(f"{what}: the signature held with the stale key")
    except InvalidSignatureException:
        pass
    try:
        data = WeChatWxaCrypto(key, answer["iv"], appid).decrypt_message(answer["encryptedData"])
    except Exception:  # wrong key: bad padding, not UTF-8, not JSON, or no watermark
        return
    fail(f"{what}: the stale key decrypted the data: {sorted(data)}")


def main():
    given = json.load(sys.stdin)
    appid = given["appid"]
    client = client_for(given["base_url"], appid, given["secret"])

    sessions = [client.wxa.code_to_session(code) for code in given["codes"]]
    keys = {s["session_key"] for s in sessions}
    if len(keys) != 1:
        fail(f"the session's login codes redeemed to {len(keys)} different keys")
    session = sessions[-1]
    key = session["session_key"]
    if len(key) != 24 or not key.endswith("=="):
        fail(f"the session key is not standard base64 of 16 bytes ({len(key)} characters)")
    print(f"ok code_to_session: all {len(sessions)} login codes redeem to the session's current key")

    if checksession(client, session["openid"], key).get("errcode") != 0:
        fail("checksession refused the current key")
    print("ok checksession accepts the current key")

    for answer in given["answers"]:
        data = verify(answer, key, appid, session)
        print(f"ok {answer['surface']}: check_wxa_signature and WeChatWxaCrypto accept it (nickName={data['nickName']})")

    stale = given["stale_key"]
    if stale == key:
        fail("the stale key is the current one: the test's logins did not replace it")
    expect_errcode("checksession with the replaced key", 87009, lambda: checksession(client, session["openid"], stale))
    print("ok checksession refuses the replaced key with 87009")
    for answer in given["answers"]:
        refused_with(answer["surface"], stale, answer, appid)
    print("ok the replaced key fails check_wxa_signature and decryption of every later answer")
    verify(given["before"], stale, appid, session)
    print("ok the answer made before the new logins verifies with the key of its time")

    first = given["answers"][0]
    try:
        WeChatWxaCrypto(key, first["iv"], "wxsomeoneelse0000").decrypt_message(first["encryptedData"])
        fail("WeChatWxaCrypto accepted the watermark for another appid")
    except InvalidAppIdException:
        pass
    print("ok the watermark names the app: another appid is refused")
    print("wechatpy user data: all ok")


if __name__ == "__main__":
    main()
