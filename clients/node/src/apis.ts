/**
 * The open APIs with typed messages: the arms of `ApiRequest` in proto/, with the host's delegate
 * method for each. One table, so the renderer, the host and the tests never list them twice.
 */
import type { ApiRequest, ApiRequest__Output } from './generated/miniapp/broker/v1/ApiRequest';
import type { ApiResponse, ApiResponse__Output } from './generated/miniapp/broker/v1/ApiResponse';
import type { DelegateMethod } from './generated/miniapp/broker/v1/DelegateMethod';

export const OPEN_APIS = {
  login: 'LOGIN',
  checkSession: 'CHECK_SESSION',
  getPhoneNumber: 'GET_PHONE_NUMBER',
  getEmail: 'GET_EMAIL',
  chooseAvatar: 'CHOOSE_AVATAR',
  getNickName: 'GET_NICK_NAME',
  getUserInfo: 'GET_USER_INFO',
  getUserProfile: 'GET_USER_PROFILE',
  requestPayment: 'REQUEST_PAYMENT',
  requestMidasPaymentGameItem: 'REQUEST_MIDAS_PAYMENT_GAME_ITEM',
  // Consent: getSetting never reaches the host; authorize asks it through getAuthCode.
  getSetting: null,
  authorize: null,
  openSetting: 'OPEN_SETTING',
} as const satisfies Record<string, DelegateMethod | null>;

/** `"login"`, `"requestPayment"`, ...: the mini program name without `wx.`. */
export type OpenApiName = keyof typeof OPEN_APIS;

export const OPEN_API_NAMES = Object.keys(OPEN_APIS) as OpenApiName[];

/** The APIs a host implements with a handler of their own. */
export type DelegatedApiName = { [N in OpenApiName]: (typeof OPEN_APIS)[N] extends null ? never : N }[OpenApiName];

/** What a caller passes for `api` (every field optional, as protobuf allows). */
export type RequestOf<N extends OpenApiName> = NonNullable<ApiRequest[N]>;
/** What a host handler receives for `api` (every field present, defaults filled in). */
export type ReceivedRequestOf<N extends OpenApiName> = NonNullable<ApiRequest__Output[N]>;
/** What a host handler answers for `api` (`errMsg` may be left out: the daemon sets it). */
export type ResponseOf<N extends OpenApiName> = NonNullable<ApiResponse[N]>;
/** What a renderer gets back for `api`. */
export type ReceivedResponseOf<N extends OpenApiName> = NonNullable<ApiResponse__Output[N]>;

export function isOpenApi(name: string): name is OpenApiName {
  return Object.prototype.hasOwnProperty.call(OPEN_APIS, name);
}

/** The APIs whose calls carry an idempotency key (one per logical payment). */
export const PAYMENT_APIS: readonly string[] = ['requestPayment', 'requestMidasPaymentGameItem'];
