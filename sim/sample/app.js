// The built-in sample app of `miniapp-brokerd dev-sim`: a button per open API. Each calls
// wx.<api> with the params WeChat's documentation shows, in callback style (success/fail/complete)
// as mini program code usually does, and shows the answer under its button.
'use strict';

const now = () => String(Math.floor(Date.now() / 1000));
const nonce = () => Math.random().toString(36).slice(2, 12);

/** Each API and the params the sample passes (a function: fresh params per call). */
const CALLS = [
  ['login', () => ({})],
  ['checkSession', () => ({})],
  ['getPhoneNumber', () => ({})],
  ['getEmail', () => ({})],
  ['chooseAvatar', () => ({})],
  ['getNickName', () => ({})],
  ['getUserInfo', () => ({})],
  ['getUserProfile', () => ({ desc: 'to show your name on your orders' })],
  ['requestPayment', () => ({
    timeStamp: now(), nonceStr: nonce(), package: 'prepay_id=wx-sample-' + nonce(), signType: 'RSA', paySign: 'sample-pay-sign',
  })],
  ['requestMidasPaymentGameItem', () => ({
    signData: JSON.stringify({
      mode: 'goods', offerId: 'sample-offer', buyQuantity: 1, env: 0, currencyType: 'CNY', productId: 'sword-1',
      goodsPrice: 100, outTradeNo: 'trade-' + nonce(),
    }),
    paySig: 'sample-pay-sig', signature: 'sample-signature',
  })],
  ['getSetting', () => ({})],
  ['authorize', () => ({ scope: 'scope.userInfo' })],
  ['openSetting', () => ({})],
];

const apis = document.getElementById('apis');
const last = document.getElementById('last');

for (const [api, params] of CALLS) {
  const row = document.createElement('div');
  row.className = 'api';
  const button = document.createElement('button');
  button.type = 'button';
  button.id = 'call-' + api;
  button.textContent = 'wx.' + api;
  const out = document.createElement('output');
  out.id = 'result-' + api;
  row.append(button, out);
  apis.append(row);
  button.addEventListener('click', () => {
    out.textContent = '…';
    out.className = 'waiting';
    const show = (kind) => (result) => {
      out.textContent = result.errMsg;
      out.className = kind;
      out.dataset.result = JSON.stringify(result);
      last.textContent = 'wx.' + api + ' → ' + kind + '\n' + JSON.stringify(result, null, 2);
    };
    wx[api]({ ...params(), success: show('success'), fail: show('fail') });
  });
}
