/**
 * miniapp-broker: the Node.js client of miniapp-brokerd.
 *
 * - `HostClient`: the superapp shell's side (delegate handlers, launch/close, signed-in user).
 * - `RendererClient`: a mini app renderer's side (typed calls on the Session stream, `invoke`).
 * - `createWx(renderer)`: the `wx.*` surface over the JSON bridge.
 */
export { OPEN_APIS, OPEN_API_NAMES, type OpenApiName, type DelegatedApiName, type RequestOf, type ResponseOf, type ReceivedRequestOf, type ReceivedResponseOf } from './apis';
export { Backoff, checkServerOwner, defaultAddress, ForeignServerError, target, CHANNEL_OPTIONS } from './connect';
export { ApiError, HostError, UserCancelled, TRANSPORT_REASON } from './failure';
export { HostClient, HostConnectError, type HostOptions, type HostHandlers, type ApiHandler, type CallContext, type Relaunched } from './host';
export { RendererClient, newPaymentKey, LAUNCH_TOKEN_HEADER, type RendererOptions, type InvokeResult } from './renderer';
export { createWx, WX_APIS, type Wx, type WxApiName, type WxFunction, type WxOptions, type WxResult, type WxInvoker, type WxInvokeResult } from './wx';
export { v1, PROTO_DIR } from './proto';
export type { SignedInUser } from './generated/miniapp/broker/v1/SignedInUser';
export type { UserProfile } from './generated/miniapp/broker/v1/UserProfile';
export type { UserInfo } from './generated/miniapp/broker/v1/UserInfo';
export type { AppInfo__Output as AppInfo } from './generated/miniapp/broker/v1/AppInfo';
export type { LaunchAppResponse__Output as LaunchAppResponse } from './generated/miniapp/broker/v1/LaunchAppResponse';
export type { StatusResponse__Output as StatusResponse } from './generated/miniapp/broker/v1/StatusResponse';
export type { Welcome__Output as Welcome } from './generated/miniapp/broker/v1/Welcome';
export type { GetAuthCodeRequest__Output as GetAuthCodeRequest } from './generated/miniapp/broker/v1/GetAuthCodeRequest';
export type { GetAuthCodeResponse } from './generated/miniapp/broker/v1/GetAuthCodeResponse';
export type { SetDecision } from './generated/miniapp/broker/v1/SetDecision';
export type { ConsentChanged__Output as ConsentChanged } from './generated/miniapp/broker/v1/ConsentChanged';
export type { Decision } from './generated/miniapp/broker/v1/Decision';
