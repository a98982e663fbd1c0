/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Benchmark: guest-measured TSC ticks per first touch of a fresh 4-KiB page, mapped by
 * the guest's own 4-level tables (a shadow page fault under rvmm and KVM ept=0; an EPT
 * violation under ept=1). Prints "touch ticks/op: N". (In Bochs, ticks count emulated
 * instructions, guest and host together.)
 */
	.intel_syntax noprefix
	.code64
	.text
	.globl _start
	.set VA, 0x8000000000
	.set TABLES, 0x400000
	.set FRAMES, 0x1000000
	.set NPAGES, 4096
_start:
	call	map_private
	/* Warm up: fault in the code and stack pages. */
	xor	eax, eax
	cpuid
	call	tsc_start
	mov	r13d, NPAGES
	movabs	rdi, VA
1:	mov	byte ptr [rdi], 1
	add	rdi, 0x1000
	dec	r13d
	jnz	1b
	mov	rcx, NPAGES
	call	tsc_per_op
	mov	r12, rax
	lea	rsi, [rip + msg]
	call	puts
	mov	rax, r12
	call	print_ticks
	jmp	done

	.include "tables.inc"
	.include "lib.inc"

	.data
msg:	.asciz	"touch"
