// A YAML writer for JSON values: what the create wizard shows and POSTs, and how the detail page
// shows a VM's manifest. Strings that could be read as something else (numbers, booleans, null,
// YAML indicators) are double-quoted with JSON escapes, which YAML reads the same way; multi-line
// strings such as cloud-init user data become literal blocks so they stay readable.

type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

const PLAIN_SAFE = /^[A-Za-z0-9_./][A-Za-z0-9_./:@+-]*$/;
const AMBIGUOUS = /^(?:y|Y|yes|Yes|YES|n|N|no|No|NO|true|True|TRUE|false|False|FALSE|on|On|ON|off|Off|OFF|null|Null|NULL|~|[-+]?(?:\.?[0-9][0-9_.eE+-]*|0x[0-9a-fA-F]+|0o[0-7]+|\.inf|\.nan))$/;

function scalar(value: string | number | boolean | null): string {
  if (value === null) return "null";
  if (typeof value !== "string") return String(value);
  if (PLAIN_SAFE.test(value) && !AMBIGUOUS.test(value) && !value.includes(": ")) return value;
  return JSON.stringify(value);
}

function literalBlock(value: string, indent: string): string | null {
  // A literal block cannot start with spaces without an indentation indicator, and cannot hold
  // carriage returns or tabs reliably: those stay quoted.
  if (!value.includes("\n") || /^[ \n]/.test(value) || /[\r\t]/.test(value)) return null;
  const trailing = value.length - value.replace(/\n+$/, "").length;
  const chomping = trailing === 0 ? "-" : trailing === 1 ? "" : "+";
  const body = value.replace(/\n+$/, "").split("\n").map((line) => (line ? indent + line : ""));
  const extra = trailing > 1 ? "\n".repeat(trailing - 1) : "";
  return `|${chomping}\n${body.join("\n")}${extra}`;
}

function write(value: Json, indent: string, lines: string[], prefix: string): void {
  if (Array.isArray(value)) {
    if (value.length === 0) {
      lines.push(`${prefix}[]`);
      return;
    }
    if (prefix) lines.push(prefix.trimEnd());
    for (const item of value) write(item, `${indent}  `, lines, `${indent}- `);
    return;
  }
  if (value !== null && typeof value === "object") {
    const entries = Object.entries(value).filter(([, item]) => item !== undefined);
    if (entries.length === 0) {
      lines.push(`${prefix}{}`);
      return;
    }
    let first = true;
    if (prefix && !prefix.trimStart().startsWith("-")) lines.push(prefix.trimEnd());
    for (const [key, item] of entries) {
      // Under "- ", the first key shares the dash's line.
      const keyPrefix = first && prefix.trimStart().startsWith("-") ? prefix : indent;
      first = false;
      const head = `${keyPrefix}${scalar(key)}:`;
      if (item !== null && typeof item === "object") {
        const empty = Array.isArray(item) ? item.length === 0 : Object.keys(item).length === 0;
        if (empty) lines.push(`${head} ${Array.isArray(item) ? "[]" : "{}"}`);
        else {
          lines.push(head);
          write(item, Array.isArray(item) ? indent : `${indent}  `, lines, "");
        }
      } else if (typeof item === "string" && literalBlock(item, `${indent}  `) !== null) {
        lines.push(`${head} ${literalBlock(item, `${indent}  `)}`);
      } else {
        lines.push(`${head} ${scalar(item)}`);
      }
    }
    return;
  }
  if (typeof value === "string") {
    const block = literalBlock(value, indent || "  ");
    lines.push(`${prefix}${block ?? scalar(value)}`);
    return;
  }
  lines.push(`${prefix}${scalar(value)}`);
}

/** The YAML text of a JSON value (an object at the top level gives a plain mapping). */
export function toYaml(value: unknown): string {
  const lines: string[] = [];
  write(value as Json, "", lines, "");
  return `${lines.join("\n")}\n`;
}
