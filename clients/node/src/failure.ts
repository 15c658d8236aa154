/**
 * Failures: the one a renderer's call ends with (`ApiError`, the proto's ApiFailure as an Error),
 * and the two a host handler throws (`HostError`, `UserCancelled`).
 */
import type { ApiFailure__Output } from './generated/miniapp/broker/v1/ApiFailure';
import type { HostError__Output } from './generated/miniapp/broker/v1/HostError';
import * as grpc from '@grpc/grpc-js';

/** The reason the client gives a failure it made itself because the daemon could not be reached. */
export const TRANSPORT_REASON = 'transport';

/** Why an open-API call failed: the daemon's ApiFailure, or one the client made (`reason` "transport"). */
export class ApiError extends Error {
  /** `"<api>:fail <reason>"`, e.g. `"requestPayment:fail cancel"`. */
  readonly errMsg: string;
  /** WeChat-style errno: the host's code for host errors, else the daemon's (docs/errors.md). */
  readonly errno: number;
  readonly grpcCode: number;
  /** Stable machine-readable reason: "cancel", "not_implemented_by_host", "no_host", "transport", ... */
  readonly reason: string;
  /** Set when the host raised the error. */
  readonly hostError?: HostError__Output;

  constructor(failure: ApiFailure__Output) {
    super(failure.errMsg);
    this.name = 'ApiError';
    this.errMsg = failure.errMsg;
    this.errno = Number(failure.errno);
    this.grpcCode = failure.grpcCode;
    this.reason = failure.reason;
    if (failure.hostError) this.hostError = failure.hostError;
  }

  /** Whether the user cancelled on the host (`"<api>:fail cancel"`). */
  get isCancel(): boolean {
    return this.errMsg.endsWith(':fail cancel');
  }

  /** The object a mini program's `fail` callback receives, as the JSON bridge shapes it. */
  toJSON(): Record<string, unknown> {
    const obj: Record<string, unknown> = { errMsg: this.errMsg, errno: this.errno };
    if (this.hostError) obj.hostError = { ...this.hostError };
    return obj;
  }
}

export function transportError(api: string, code: grpc.status, message: string): ApiError {
  return new ApiError({ errMsg: `${api}:fail ${message}`, errno: 1005, grpcCode: code, reason: TRANSPORT_REASON, hostError: null });
}

/** Status codes that mean "the daemon was not reached, or went away": worth a retry. */
export function isTransportCode(code: grpc.status): boolean {
  return code === grpc.status.UNAVAILABLE || code === grpc.status.UNKNOWN || code === grpc.status.CANCELLED;
}

/** Thrown by a host handler: an NSError-style error the renderer gets unchanged (domain, code, message). */
export class HostError extends Error {
  constructor(
    readonly domain: string,
    readonly code: number,
    message: string,
  ) {
    super(message);
    this.name = 'HostError';
  }
}

/** Thrown by a host handler when the user cancelled (closed the payment sheet, refused consent):
 * the renderer gets `"<api>:fail cancel"`. */
export class UserCancelled extends Error {
  constructor(message = '') {
    super(message);
    this.name = 'UserCancelled';
  }
}
