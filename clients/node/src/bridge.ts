/**
 * The JSON bridge's mapping, on the client's side, so that `invoke` can go over the Session stream
 * instead of the unary `OpenApi.Invoke`: a mini program's params object to a typed `ApiRequest`
 * when the daemon would read it to exactly that request, and a typed answer back to the object
 * `Invoke` would have returned (src/json.rs in the daemon's crate: WeChat camelCase names, fields
 * in proto order, the credentials WeChat leaves out left out; an answer with a map in it, and a
 * failure, with every object's keys sorted, as the daemon prints those from a `serde_json::Value`).
 *
 * The field lists come from the loaded `.proto` descriptors, so a field added to proto/ is known
 * here without a change. What this module cannot map with certainty (a value of the wrong type, an
 * unknown API, a nested value, a field kind it does not handle, a large object) it refuses, and the
 * call takes `Invoke`, where the daemon makes the one answer; a refusal here is never an answer.
 */
import type { ApiRequest } from './generated/miniapp/broker/v1/ApiRequest';
import type { ApiResponse__Output } from './generated/miniapp/broker/v1/ApiResponse';
import type { ApiFailure__Output } from './generated/miniapp/broker/v1/ApiFailure';
import { definition } from './proto';
import type { WxResult } from './wx';

const PACKAGE = 'miniapp.broker.v1';

/**
 * Params whose strings add up to more than this many UTF-16 units go through `Invoke`: a message
 * over the daemon's size limit ends the stream it came on (failing every call waiting on it),
 * where a unary call fails alone. Far below the daemon's default limit (64 KiB), far above any
 * WeChat params object.
 */
export const STREAM_PARAMS_MAX_CHARS = 8 * 1024;

/**
 * The fields the daemon's bridge leaves out of a success object when they are empty (build.rs:
 * `skip_serializing_if`): the credentials WeChat gives only with a session, and an absent profile.
 */
const OMITTED_WHEN_EMPTY: Readonly<Record<string, readonly string[]>> = {
  GetUserInfoResponse: ['userInfo', 'rawData', 'signature', 'encryptedData', 'iv'],
  GetUserProfileResponse: ['userInfo', 'rawData', 'signature', 'encryptedData', 'iv'],
};

/** A field of a loaded message descriptor (proto-loader's DescriptorProto, camelCase names). */
interface FieldDescriptor {
  name: string;
  type: string;
  label: string;
  typeName: string;
}

/** A loaded message descriptor. */
interface MessageDescriptor {
  name: string;
  field: FieldDescriptor[];
  nestedType: MessageDescriptor[];
  options: { mapEntry?: boolean } | null;
}

/** Whether a JSON value fits one scalar field exactly as serde reads it. */
type Check = (value: unknown) => boolean;

/** Converts one field's decoded value to what serde writes for it. */
type Convert = (value: unknown) => unknown;

/** What the bridge knows of one API: its arm name, how to check its params, how to write its answer. */
interface ApiPlan {
  fields: ReadonlyMap<string, Check>;
  /** Undefined when some field of the answer is of a kind this module does not write. */
  answer: ((arm: Record<string, unknown>) => WxResult) | undefined;
}

const isString: Check = (v) => typeof v === 'string' && !LONE_SURROGATE.test(v);
/** serde_json refuses a string with half a surrogate pair; JSON.stringify writes one as an escape. */
const LONE_SURROGATE = /[\uD800-\uDFFF]/u;

function integer(min: number, max: number): Check {
  return (v) => typeof v === 'number' && Number.isInteger(v) && v >= min && v <= max;
}

/** The scalar kinds whose JSON form this module checks exactly (others send the call to Invoke). */
const SCALAR_CHECKS: Readonly<Record<string, Check>> = {
  TYPE_STRING: isString,
  TYPE_BOOL: (v) => typeof v === 'boolean',
  TYPE_UINT32: integer(0, 0xffff_ffff),
  TYPE_FIXED32: integer(0, 0xffff_ffff),
  TYPE_INT32: integer(-0x8000_0000, 0x7fff_ffff),
  TYPE_SINT32: integer(-0x8000_0000, 0x7fff_ffff),
  TYPE_SFIXED32: integer(-0x8000_0000, 0x7fff_ffff),
  // 64-bit integers: only the ones a JS number holds exactly.
  TYPE_UINT64: integer(0, Number.MAX_SAFE_INTEGER),
  TYPE_FIXED64: integer(0, Number.MAX_SAFE_INTEGER),
  TYPE_INT64: integer(Number.MIN_SAFE_INTEGER, Number.MAX_SAFE_INTEGER),
  TYPE_SINT64: integer(Number.MIN_SAFE_INTEGER, Number.MAX_SAFE_INTEGER),
  TYPE_SFIXED64: integer(Number.MIN_SAFE_INTEGER, Number.MAX_SAFE_INTEGER),
};

/** The kinds whose decoded value (strings, booleans, JS numbers) is what serde writes. */
const PLAIN_KINDS = new Set(Object.keys(SCALAR_CHECKS));

function lookup(typeName: string, parent?: MessageDescriptor): MessageDescriptor | undefined {
  const nested = parent?.nestedType.find((t) => t.name === typeName);
  if (nested) return nested;
  const name = typeName.startsWith('.') ? typeName.slice(1) : typeName;
  const entry = (definition[`${PACKAGE}.${name}`] ?? definition[name]) as { type?: MessageDescriptor } | undefined;
  return entry?.type;
}

/** How a decoded message of `message` becomes serde's object, or undefined if a field cannot. */
function messageWriter(message: MessageDescriptor, depth = 0): Convert | undefined {
  if (depth > 8) return undefined;
  const omitted = new Set(OMITTED_WHEN_EMPTY[message.name] ?? []);
  const fields: [string, Convert, boolean][] = [];
  for (const f of message.field) {
    const convert = fieldWriter(f, message, depth);
    if (!convert) return undefined;
    fields.push([f.name, convert, omitted.has(f.name)]);
  }
  return (value) => {
    if (value === null || value === undefined) return null;
    const source = value as Record<string, unknown>;
    const out: Record<string, unknown> = {};
    for (const [name, convert, omitWhenEmpty] of fields) {
      const v = convert(source[name]);
      if (omitWhenEmpty && (v === null || v === '')) continue;
      out[name] = v;
    }
    return out;
  };
}

function fieldWriter(f: FieldDescriptor, parent: MessageDescriptor, depth: number): Convert | undefined {
  if (f.type !== 'TYPE_MESSAGE') {
    if (!PLAIN_KINDS.has(f.type)) return undefined;
    return f.label === 'LABEL_REPEATED' ? (v) => (Array.isArray(v) ? [...v] : []) : (v) => v;
  }
  const target = lookup(f.typeName, parent);
  if (!target) return undefined;
  if (target.options?.mapEntry) {
    const [key, value] = target.field;
    if (key?.type !== 'TYPE_STRING' || !value || value.type === 'TYPE_MESSAGE' || !PLAIN_KINDS.has(value.type)) return undefined;
    // serde writes a BTreeMap<String, _>: keys in UTF-8 byte order, which is code point order.
    return (v) => {
      const entries = Object.entries((v ?? {}) as Record<string, unknown>).sort(([a], [b]) => compareCodePoints(a, b));
      return Object.fromEntries(entries);
    };
  }
  const nested = messageWriter(target, depth + 1);
  if (!nested) return undefined;
  return f.label === 'LABEL_REPEATED' ? (v) => (Array.isArray(v) ? v.map(nested) : []) : nested;
}

/** Whether `message` or a message in it has a map field. */
function hasMap(message: MessageDescriptor, depth = 0): boolean {
  if (depth > 8) return false;
  return message.field.some((f) => {
    if (f.type !== 'TYPE_MESSAGE') return false;
    const target = lookup(f.typeName, message);
    return !!target && (!!target.options?.mapEntry || hasMap(target, depth + 1));
  });
}

/** `value` with the keys of every object in it sorted (serde_json's `Map` is a BTreeMap). */
function sortKeys(value: unknown): unknown {
  if (Array.isArray(value)) return value.map(sortKeys);
  if (value === null || typeof value !== 'object') return value;
  const entries = Object.entries(value as Record<string, unknown>).sort(([a], [b]) => compareCodePoints(a, b));
  return Object.fromEntries(entries.map(([k, v]) => [k, sortKeys(v)]));
}

function compareCodePoints(a: string, b: string): number {
  const x = [...a];
  const y = [...b];
  for (let i = 0; i < Math.min(x.length, y.length); i++) {
    const d = x[i].codePointAt(0)! - y[i].codePointAt(0)!;
    if (d !== 0) return d;
  }
  return x.length - y.length;
}

function plan(api: string): ApiPlan | undefined {
  const request = lookup(`${PACKAGE}.ApiRequest`)?.field.find((f) => f.name === api);
  const response = lookup(`${PACKAGE}.ApiResponse`)?.field.find((f) => f.name === api);
  const requestType = request && lookup(request.typeName);
  const responseType = response && lookup(response.typeName);
  if (!requestType || !responseType) return undefined;
  const fields = new Map<string, Check>();
  for (const f of requestType.field) {
    const check = f.label === 'LABEL_REPEATED' ? undefined : SCALAR_CHECKS[f.type];
    // A field of another kind is known (so not ignorable) but not checked here: Invoke reads it.
    fields.set(f.name, check ?? (() => false));
  }
  const write = messageWriter(responseType);
  if (!write) return { fields, answer: undefined };
  const sorted = hasMap(responseType);
  return { fields, answer: (arm) => (sorted ? sortKeys(write(arm)) : write(arm)) as WxResult };
}

const plans = new Map<string, ApiPlan>();

function planOf(api: string): ApiPlan | undefined {
  const known = plans.get(api);
  if (known) return known;
  // Only the APIs of the proto are kept, so names a caller makes up cost nothing to remember.
  const made = plan(api);
  if (made) plans.set(api, made);
  return made;
}

/**
 * The typed request the daemon's bridge would read `params` (functions already dropped) as, or
 * undefined when that is not certain: then the call goes through `Invoke`. Unknown keys are
 * ignored, as the daemon ignores them, when their value is a string, number, boolean or null.
 */
export function requestFromParams(api: string, params: Record<string, unknown>): ApiRequest | undefined {
  const p = planOf(api);
  if (!p?.answer) return undefined;
  const arm: Record<string, unknown> = {};
  let chars = 0;
  for (const key of Object.keys(params)) {
    const value = params[key];
    // JSON.stringify leaves such keys out.
    if (value === undefined) continue;
    chars += key.length;
    const check = p.fields.get(key);
    if (check) {
      if (!check(value)) return undefined;
      arm[key] = value;
      if (typeof value === 'string') chars += value.length;
      continue;
    }
    if (typeof value === 'string') {
      if (LONE_SURROGATE.test(value)) return undefined;
      chars += value.length;
    } else if (!(value === null || typeof value === 'boolean' || typeof value === 'number')) {
      return undefined;
    }
  }
  if (chars > STREAM_PARAMS_MAX_CHARS) return undefined;
  return { [api]: arm } as ApiRequest;
}

/** The success object `Invoke` would return for `response`, the answer to a call of `api`. */
export function successObject(api: string, response: ApiResponse__Output): WxResult | undefined {
  const arm = (response as unknown as Record<string, Record<string, unknown> | null | undefined>)[api];
  const write = planOf(api)?.answer;
  return arm && write ? write(arm) : undefined;
}

/** The fail object `Invoke` would return for `failure` (the daemon's `failure_to_json`, keys sorted). */
export function failureObject(failure: ApiFailure__Output): WxResult {
  const obj: WxResult = { errMsg: failure.errMsg, errno: Number(failure.errno) };
  const h = failure.hostError;
  if (h) obj.hostError = { code: Number(h.code), domain: h.domain, message: h.message };
  return obj;
}
